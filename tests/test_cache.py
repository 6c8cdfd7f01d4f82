"""The preprocessing cache: later loads decode nothing that did not change."""

import os
import stat
import subprocess

import numpy as np
import pytest

from fedmed.data import ReadOptions, SiteSource, load_site
from fedmed.data.site import site_cache_key
from tests.conftest import write_synthetic_site
from tests.federation_helpers import BIN


def test_second_load_decodes_nothing_and_gives_the_same_images(mixed_site, tmp_path):
    source = SiteSource(mixed_site, classes=("normal", "pneumonia"))
    first = load_site(source, cache_dir=tmp_path / "cache")
    second = load_site(source, cache_dir=tmp_path / "cache")
    # Everything is decoded but the two files skipped by their place: edema/ and README.txt.
    assert first.report.decoded == len(first.report.outcomes) - 2
    assert second.report.decoded == 0
    assert second.report.from_cache == first.report.decoded
    np.testing.assert_array_equal(first.images, second.images)
    assert first.paths == second.paths
    assert [o.reason for o in first.report.outcomes] == [o.reason for o in second.report.outcomes]


def test_touching_one_file_decodes_just_that_file(synthetic_site, tmp_path):
    source = SiteSource(synthetic_site)
    first = load_site(source, cache_dir=tmp_path / "cache")
    touched = sorted(synthetic_site.rglob("*.dcm"))[3]
    info = touched.stat()
    os.utime(touched, ns=(info.st_atime_ns, info.st_mtime_ns + 1_000_000_000))
    second = load_site(source, cache_dir=tmp_path / "cache")
    assert second.report.decoded == 1
    assert second.report.from_cache == len(first) - 1
    np.testing.assert_array_equal(first.images, second.images)
    assert load_site(source, cache_dir=tmp_path / "cache").report.decoded == 0


def test_a_replaced_file_gets_its_new_image(tmp_path):
    root = write_synthetic_site(tmp_path / "site", n_images=12)
    other = write_synthetic_site(tmp_path / "other", n_images=12, seed=5)
    source = SiteSource(root)
    first = load_site(source, cache_dir=tmp_path / "cache")
    target = root / first.paths[0]
    target.write_bytes((other / first.paths[0].split("/")[0]).glob("*.dcm").__next__().read_bytes())
    second = load_site(source, cache_dir=tmp_path / "cache")
    assert second.report.decoded == 1
    assert not np.array_equal(second.images[0], first.images[0])
    np.testing.assert_array_equal(second.images[1:], first.images[1:])


def test_new_and_removed_files_update_the_cache(synthetic_site, tmp_path):
    source = SiteSource(synthetic_site)
    first = load_site(source, cache_dir=tmp_path / "cache")
    removed = synthetic_site / first.paths[-1]
    removed.unlink()
    second = load_site(source, cache_dir=tmp_path / "cache")
    assert second.report.decoded == 0 and len(second) == len(first) - 1
    np.testing.assert_array_equal(second.images, first.images[:-1])


def test_other_preprocessing_options_use_their_own_cache(synthetic_site, tmp_path):
    source = SiteSource(synthetic_site)
    load_site(source, ReadOptions(image_size=32), tmp_path / "cache")
    bigger = load_site(source, ReadOptions(image_size=48), tmp_path / "cache")
    assert bigger.report.decoded == len(bigger) and bigger.images.shape[1:] == (48, 48)
    assert load_site(source, ReadOptions(image_size=32), tmp_path / "cache").report.decoded == 0


def test_a_damaged_cache_is_rebuilt_not_trusted(synthetic_site, tmp_path):
    source = SiteSource(synthetic_site)
    first = load_site(source, cache_dir=tmp_path / "cache")
    for index in (tmp_path / "cache").rglob("index.json"):
        index.write_text("{ torn")
    again = load_site(source, cache_dir=tmp_path / "cache")
    assert again.report.decoded == len(first)
    np.testing.assert_array_equal(again.images, first.images)


def _tree_digest(folder):
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_the_cache_is_private_and_purge_cache_removes_only_what_fedmed_wrote(tmp_path):
    first = write_synthetic_site(tmp_path / "site-a", n_images=8)
    second = write_synthetic_site(tmp_path / "site-b", n_images=8, seed=4)
    sources = _tree_digest(tmp_path / "site-a") | _tree_digest(tmp_path / "site-b")
    cache = tmp_path / "cache"
    for root in (first, second):
        load_site(SiteSource(root), cache_dir=cache)
    (cache / "notes").mkdir()
    (cache / "notes" / "keep.txt").write_text("not fedmed's")
    site_folders = [cache / site_cache_key(SiteSource(root)) for root in (first, second)]
    for folder in site_folders:
        inner = [p for p in folder.rglob("*")]
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert all(stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600) for p in inner), inner

    env = {**os.environ, "FEDMED_CACHE_DIR": str(cache)}
    only_a = subprocess.run([str(BIN / "fedmed"), "data", "purge-cache", "--data", str(first)],
                            capture_output=True, text=True, env=env)
    assert only_a.returncode == 0, only_a.stderr
    assert not site_folders[0].exists() and site_folders[1].is_dir()
    everything = subprocess.run([str(BIN / "fedmed"), "data", "purge-cache"], capture_output=True, text=True,
                                env=env)
    assert everything.returncode == 0 and "1 cached site folder(s) removed" in everything.stdout
    assert not site_folders[1].exists()
    assert (cache / "notes" / "keep.txt").read_text() == "not fedmed's", "folders fedmed did not write stay"
    assert _tree_digest(tmp_path / "site-a") | _tree_digest(tmp_path / "site-b") == sources, "sources untouched"
