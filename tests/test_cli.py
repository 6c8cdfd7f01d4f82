"""The `fedmed data` commands, run as a user runs them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tree_state

FEDMED = [sys.executable, "-m", "fedmed.cli.main"]


def fedmed(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "FEDMED_CACHE_DIR": str(cwd / "cache"), "PYTHONWARNINGS": "ignore", **env}
    return subprocess.run([*FEDMED, *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_validate_prints_counts_and_every_skipped_file(mixed_site, tmp_path):
    before = tree_state(mixed_site)
    result = fedmed("data", "validate", str(mixed_site), "--classes", "normal,pneumonia", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "used: 20" in out
    for line in (
        "normal/notes.txt  [not-dicom]",
        "pneumonia/truncated.dcm  [decode-failure]",
        "normal/rtplan.dcm  [no-pixel-data]",
        "normal/cine.dcm  [multi-frame]: 30 frames",
        "edema/case.dcm  [unknown-label]: folder 'edema'",
        "README.txt  [outside-class-folder]",
        "normal/zz-copy.dcm  [duplicate-sop-instance-uid]",
    ):
        assert line in out
    again = fedmed("data", "validate", str(mixed_site), "--classes", "normal,pneumonia", "--json", cwd=tmp_path)
    report = json.loads(again.stdout)
    assert report["decoded"] == 0 and report["from_cache"] == 26
    assert report["used"] == 20 and sum(report["class_counts"].values()) == 20
    assert tree_state(mixed_site) == before


@pytest.mark.slow
def test_validate_fails_when_nothing_is_usable(tmp_path):
    (tmp_path / "site" / "normal").mkdir(parents=True)
    (tmp_path / "site" / "normal" / "a.txt").write_text("not an image")
    result = fedmed("data", "validate", "site", "--no-cache", cwd=tmp_path)
    assert result.returncode == 1
    assert "no usable image in site" in result.stderr
    missing = fedmed("data", "validate", "nowhere", cwd=tmp_path)
    assert missing.returncode == 2 and "site data not found: nowhere" in missing.stderr


@pytest.mark.slow
def test_make_sites_synthetic_writes_sites_and_prints_the_class_table(tmp_path):
    args = ("data", "make-sites", "--synthetic", "--sites", "3", "--images", "120", "--image-size", "32", "--seed", "5")
    result = fedmed(*args, "--out", "sites", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sites" / "sites.json").read_text())
    table = result.stdout.splitlines()
    for site, line in zip(summary["sites"], table[1:4]):
        assert line.split() == [site["name"], *map(str, site["class_counts"].values()), str(site["images"])]
        assert len(list((tmp_path / "sites" / site["name"]).rglob("*.dcm"))) == site["images"]
    again = fedmed(*args, "--out", "again", cwd=tmp_path)
    assert again.stdout.splitlines()[:5] == table[:5], "same seed, same sites"
    refused = fedmed(*args, "--out", "sites", cwd=tmp_path)
    assert refused.returncode == 2 and "never overwrites" in refused.stderr


@pytest.mark.slow
def test_make_sites_from_npz(tmp_path):
    made = fedmed("data", "synth", "pool.npz", "--images", "150", "--image-size", "28", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    with np.load(tmp_path / "pool.npz") as pool:
        assert pool["train_images"].shape[1:] == (28, 28)
        n_train = len(pool["train_labels"])
        assert n_train + len(pool["val_labels"]) + len(pool["test_labels"]) == 150
    result = fedmed("data", "make-sites", "--npz", "pool.npz", "--classes", "normal,pneumonia",
                    "--sites", "2", "--min-site-size", "5", "--out", "sites", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "sites" / "sites.json").read_text())
    assert sum(s["images"] for s in summary["sites"]) == n_train
    bad = fedmed("data", "make-sites", "--npz", "pool.npz", "--split", "extra", "--out", "x", cwd=tmp_path)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


@pytest.mark.slow
def test_synth_writes_a_valid_dicom_site(tmp_path):
    made = fedmed("data", "synth", "site", "--images", "30", "--style", "monochrome1-16bit", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    checked = fedmed("data", "validate", "site", "--json", "--no-cache", cwd=tmp_path)
    report = json.loads(checked.stdout)
    assert report["used"] == 30 and report["skipped"] == 0


@pytest.mark.parametrize("command", ["validate", "make-sites", "synth"])
@pytest.mark.slow
def test_every_command_explains_itself(command, tmp_path):
    result = fedmed("data", command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "usage: fedmed data " + command in result.stdout
    assert len(result.stdout.splitlines()) > 8
