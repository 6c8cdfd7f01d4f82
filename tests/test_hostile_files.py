"""Bad files never hang or kill a site: pipes, devices, huge or all-zero files, names that
are not UTF-8, and manifest paths leading out of the site's folder are skipped with a
reason, and the rest of the site loads.

Anything that could block on today's code (a FIFO, /dev/zero) runs in a child process
with a timeout, so a regression fails the test instead of hanging it."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from fedmed.config import RunSettings, SiteSettings
from fedmed.data import ReadOptions, SiteSource, SkipReason, load_site
from fedmed.data import cache as cache_module
from fedmed.data import dicom as dicom_module
from fedmed.data.dicom import MB, DicomReadError, check_file, read_dicom
from fedmed.data.report import printable
from tests.conftest import pydicom_file, write_synthetic_site
from tests.federation_helpers import BIN, process_env

BAD_NAME = b"\xff\xfe.dcm"  # not UTF-8: os.walk hands it over as '\udcff\udcfe.dcm'
SHOWN_BAD_NAME = "normal/\\xff\\xfe.dcm"  # how reports must show it
LIMIT_MB = 1
CLASSES = ("normal", "pneumonia")


def sparse_file(path: Path, size: int) -> Path:
    """A file of ``size`` zero bytes that costs no disk."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


@pytest.fixture
def hostile_site(tmp_path: Path) -> Path:
    """Real DICOM files plus every kind of hostile entry a class folder can hold."""
    root = write_synthetic_site(tmp_path / "site", n_images=12)
    normal = root / "normal"
    os.mkfifo(normal / "pipe.dcm")
    os.symlink("/dev/zero", normal / "zero.dcm")
    os.symlink(normal / "nothing-here.dcm", normal / "dangling.dcm")
    os.symlink("..", normal / "loop")  # a linked folder that would walk in circles
    with open(os.path.join(os.fsencode(normal), BAD_NAME), "wb") as handle:
        handle.write(b"exported by the scanner's service tool\n")
    sparse_file(normal / "huge.dcm", 3 * LIMIT_MB * MB)
    sparse_file(normal / "zeros.dcm", LIMIT_MB * MB - 4096)  # below the limit: must be refused by its header
    return root


def expected_skips() -> dict[str, str]:
    return {
        "normal/pipe.dcm": SkipReason.NOT_A_REGULAR_FILE.value,
        "normal/zero.dcm": SkipReason.NOT_A_REGULAR_FILE.value,
        "normal/loop": SkipReason.NOT_A_REGULAR_FILE.value,
        "normal/dangling.dcm": SkipReason.MISSING_FILE.value,
        SHOWN_BAD_NAME: SkipReason.NOT_DICOM.value,
        "normal/huge.dcm": SkipReason.TOO_LARGE.value,
        "normal/zeros.dcm": SkipReason.NOT_DICOM.value,
    }


def strict_utf8_env(tmp_path: Path) -> dict[str, str]:
    """A child whose stdout refuses lone surrogates, as the attacker's probe had it (a
    C.UTF-8 locale would have Python escape them by itself)."""
    return {**process_env(tmp_path), "PYTHONIOENCODING": "utf-8:strict"}


def validate(site: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [str(BIN / "fedmed"), "data", "validate", str(site), "--classes", ",".join(CLASSES),
               "--no-cache", "--max-file-mb", str(LIMIT_MB), *extra]
    return subprocess.run(command, capture_output=True, env=strict_utf8_env(tmp_path), timeout=60)


@pytest.mark.slow
def test_validate_skips_every_hostile_file_and_loads_the_rest(hostile_site, tmp_path):
    good = sorted(str(p.relative_to(hostile_site)) for p in hostile_site.glob("*/SYN*.dcm"))
    result = validate(hostile_site, tmp_path, "--json")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    report = json.loads(result.stdout)
    skipped = {entry["path"]: entry for entry in report["skipped_files"]}
    assert {path: entry["reason"] for path, entry in skipped.items()} == expected_skips()
    assert report["used"] == len(good) and report["skipped"] == len(expected_skips())
    assert "named pipe" in skipped["normal/pipe.dcm"]["detail"]
    assert "character device" in skipped["normal/zero.dcm"]["detail"]
    huge = skipped["normal/huge.dcm"]["detail"]
    assert "3,000,000 bytes" in huge and "1.0 MB" in huge and "max_file_mb" in huge


@pytest.mark.slow
def test_validate_prints_a_name_that_is_not_utf8_escaped(hostile_site, tmp_path):
    result = validate(hostile_site, tmp_path)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    text = result.stdout.decode("utf-8")  # strict: the output itself must be valid UTF-8
    assert f"{SHOWN_BAD_NAME}  [not-dicom]" in text
    assert "Traceback" not in result.stderr.decode(errors="replace")


def test_the_site_loads_beside_a_fifo_without_blocking(hostile_site, tmp_path):
    """``load_site`` itself, as ``fedmed-client`` calls it, in a child that may not hang."""
    code = (
        "import sys; from pathlib import Path; from fedmed.data import ReadOptions, SiteSource, load_site; "
        f"site = load_site(SiteSource.from_path(sys.argv[1], classes={CLASSES!r}), "
        f"ReadOptions(max_file_bytes={LIMIT_MB * MB}), Path(sys.argv[2])); "
        "print(len(site), sorted((o.path, o.reason.value) for o in site.report.skipped))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(hostile_site), str(tmp_path / "cache")],
                            capture_output=True, text=True, timeout=60, env=strict_utf8_env(tmp_path))
    assert result.returncode == 0, result.stderr
    count, skipped = result.stdout.split(" ", 1)
    assert int(count) == len(list(hostile_site.glob("*/SYN*.dcm")))
    assert skipped.strip() == str(sorted(expected_skips().items()))


def test_check_file_refuses_pipes_devices_and_size_by_stat(tmp_path):
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    for path, reason in ((fifo, SkipReason.NOT_A_REGULAR_FILE), (Path("/dev/null"), SkipReason.NOT_A_REGULAR_FILE),
                         (tmp_path, SkipReason.NOT_A_REGULAR_FILE), (tmp_path / "absent", SkipReason.MISSING_FILE),
                         (sparse_file(tmp_path / "big", 2001), SkipReason.TOO_LARGE)):
        with pytest.raises(DicomReadError) as caught:
            check_file(path, max_bytes=2000)
        assert caught.value.reason is reason and str(path) in str(caught.value)
    assert check_file(pydicom_file("CT_small.dcm"), max_bytes=2000 * MB).st_size > 0


@pytest.mark.parametrize("content", ["zeros", "random", "dicm-then-zeros"])
def test_files_that_are_not_dicom_are_refused_by_their_header_alone(content, tmp_path, monkeypatch):
    """pydicom's force mode parses a whole file: an all-zero 2 GB file took 11 minutes."""
    path = tmp_path / "scan.dcm"
    if content == "zeros":
        sparse_file(path, 50 * MB)
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(2 * MB))
    else:
        path.write_bytes(b"\0" * 128 + b"DICM")
        with open(path, "r+b") as handle:
            handle.truncate(50 * MB)
    calls: list[dict] = []
    real = pydicom.dcmread
    monkeypatch.setattr(dicom_module.pydicom, "dcmread", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    with pytest.raises(DicomReadError) as caught:
        read_dicom(path)
    expected = SkipReason.INVALID_HEADER if content == "dicm-then-zeros" else SkipReason.NOT_DICOM
    assert caught.value.reason is expected
    assert calls == [], "the file was handed to pydicom to parse"


@pytest.mark.parametrize("name, reason", [("rtstruct.dcm", SkipReason.NO_PIXEL_DATA),
                                          ("ExplVR_LitEndNoMeta.dcm", SkipReason.NO_PIXEL_DATA),
                                          ("ExplVR_BigEndNoMeta.dcm", SkipReason.NO_PIXEL_DATA)])
def test_legacy_files_without_the_dicm_prefix_are_still_parsed(name, reason, monkeypatch):
    """A guard on the header check: it must not refuse real preamble-less files."""
    with open(pydicom_file(name), "rb") as handle:
        assert handle.read(132)[128:] != b"DICM"
    forced: list[bool] = []
    real = pydicom.dcmread
    monkeypatch.setattr(dicom_module.pydicom, "dcmread",
                        lambda *a, **kw: forced.append(kw.get("force", False)) or real(*a, **kw))
    with pytest.raises(DicomReadError) as caught:
        read_dicom(pydicom_file(name))
    assert caught.value.reason is reason, caught.value.detail
    assert True in forced, "parsed in pydicom's force mode, as a file without the 'DICM' prefix needs"


def test_a_file_skipped_by_size_is_never_decoded_and_counts_again_when_the_limit_rises(tmp_path, monkeypatch):
    root = write_synthetic_site(tmp_path / "site", n_images=6)
    big = root / "normal" / "big.dcm"
    shutil.copy(pydicom_file("CT_small.dcm"), big)
    limit = big.stat().st_size - 1
    decoded: list[Path] = []
    real = cache_module.read_dicom
    monkeypatch.setattr(cache_module, "read_dicom", lambda path, options: decoded.append(path) or real(path, options))
    source = SiteSource(root, classes=CLASSES)
    first = load_site(source, ReadOptions(max_file_bytes=limit), tmp_path / "cache")
    assert {o.path: o.reason for o in first.report.skipped} == {"normal/big.dcm": SkipReason.TOO_LARGE}
    assert big not in decoded and len(first) == 6
    raised = load_site(source, ReadOptions(max_file_bytes=limit + 1), tmp_path / "cache")
    assert raised.report.skipped == [] and len(raised) == 7, "a too-large outcome must not be cached"
    assert decoded.count(big) == 1


def test_a_name_that_is_not_utf8_is_escaped_in_every_report(tmp_path):
    root = write_synthetic_site(tmp_path / "site", n_images=6)
    with open(os.path.join(os.fsencode(root / "normal"), BAD_NAME), "wb") as handle:
        handle.write(b"not an image\n")
    bad_class = os.path.join(os.fsencode(root), b"caf\xe9")  # a Latin-1 folder name
    os.mkdir(bad_class)
    shutil.copy(pydicom_file("CT_small.dcm"), os.path.join(bad_class, b"x.dcm"))
    report = load_site(SiteSource(root, classes=CLASSES)).report
    text, data = report.to_text(), report.to_json()
    text.encode("utf-8")  # raises on the lone surrogates of an unescaped name
    data.encode("utf-8")
    assert f"{SHOWN_BAD_NAME}  [not-dicom]" in text
    assert "caf\\xe9/x.dcm  [unknown-label]" in text
    assert {entry["path"] for entry in json.loads(data)["skipped_files"]} == {SHOWN_BAD_NAME, "caf\\xe9/x.dcm"}


def test_printable_escapes_bytes_and_control_characters_and_keeps_good_names():
    assert printable(os.fsdecode(b"a/\xff.dcm")) == "a/\\xff.dcm"
    assert printable("normal/ok\nforged  [used]") == "normal/ok\\nforged  [used]"
    assert printable("pneumonia/Ärztin-ü.dcm") == "pneumonia/Ärztin-ü.dcm"
    assert printable(printable(os.fsdecode(b"\xfe\x01"))) == "\\xfe\\x01"


def test_the_clients_report_printing_survives_a_strict_stdout(tmp_path, monkeypatch):
    from fedmed.cli.client import print_site_data
    from fedmed.site.data import load_site_split

    root = write_synthetic_site(tmp_path / "site", n_images=12)
    with open(os.path.join(os.fsencode(root / "normal"), BAD_NAME), "wb") as handle:
        handle.write(b"not an image\n")
    site = SiteSettings(name="st-mary", data=str(root), cache_dir=str(tmp_path / "cache"),
                        ledger=str(tmp_path / "ledger.jsonl"))
    split = load_site_split(RunSettings(classes="normal,pneumonia", image_size=32), site)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="utf-8", errors="strict"))
    print_site_data(split, site)
    sys.stdout.flush()
    text = raw.getvalue().decode("utf-8")
    assert f"{SHOWN_BAD_NAME}  [not-dicom]" in text and "site st-mary: " in text


def write_manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    manifest = folder / "site.csv"
    manifest.write_text("path,label\n" + "".join(f"{path},{label}\n" for path, label in rows))
    return manifest


def test_manifest_paths_must_stay_in_the_manifests_folder(tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "outside.dcm")
    shutil.copy(pydicom_file("JPGExtended.dcm"), tmp_path / "elsewhere.dcm")
    shutil.copy(pydicom_file("examples_palette.dcm"), tmp_path / "linked.dcm")
    os.symlink(tmp_path / "linked.dcm", folder / "link.dcm")  # inside by name, outside by target
    shutil.copy(pydicom_file("SC_rgb_rle.dcm"), folder / "inside.dcm")
    (folder / "sub").mkdir()
    shutil.copy(pydicom_file("693_J2KI.dcm"), folder / "sub" / "deeper.dcm")
    rows = [("../outside.dcm", "normal"), (str(tmp_path / "elsewhere.dcm"), "normal"), ("link.dcm", "pneumonia"),
            ("inside.dcm", "normal"), ("sub/../sub/deeper.dcm", "pneumonia"), (str(folder / "inside.dcm"), "normal")]
    manifest = write_manifest(folder, rows)

    site = load_site(SiteSource.from_path(manifest, classes=CLASSES))
    reasons = {o.path: o.reason for o in site.report.outcomes}
    for path in ("../outside.dcm", str(tmp_path / "elsewhere.dcm"), "link.dcm"):
        assert reasons[path] is SkipReason.OUTSIDE_SITE_FOLDER
    assert "allow_outside_paths" in next(o.detail for o in site.report.skipped if o.path == "../outside.dcm")
    assert sorted(site.paths) == ["inside.dcm", "sub/../sub/deeper.dcm"]
    assert reasons[str(folder / "inside.dcm")] is SkipReason.DUPLICATE_SOP_INSTANCE, "absolute but inside: read"

    allowed = load_site(SiteSource.from_path(manifest, classes=CLASSES, allow_outside_paths=True))
    assert len(allowed) == 5 and allowed.report.skip_counts() == {"duplicate-sop-instance-uid": 1}


def test_the_site_settings_reach_the_sites_loader(tmp_path):
    """max_file_mb and allow_outside_paths are declared once in SiteSettings and used by
    load_site_split, as fedmed-client and simulations load a site."""
    from fedmed.site.data import load_site_split

    folder = write_synthetic_site(tmp_path / "site", n_images=8)
    shutil.copy(pydicom_file("CT_small.dcm"), tmp_path / "outside.dcm")
    sparse_file(folder / "huge.dcm", 2 * MB)
    good = [(str(p.relative_to(folder)), p.parent.name) for p in sorted(folder.glob("*/SYN*.dcm"))]
    manifest = write_manifest(folder, [*good, ("../outside.dcm", "normal"), ("huge.dcm", "normal")])
    run = RunSettings(classes="normal,pneumonia", image_size=32)

    def skipped(**settings) -> dict[str, str]:
        site = SiteSettings(name="a", data=str(manifest), cache_dir=str(tmp_path / "cache"), **settings)
        return {o.path: o.reason.value for o in load_site_split(run, site).data.report.skipped}

    assert skipped(max_file_mb=1) == {"../outside.dcm": "outside-site-folder", "huge.dcm": "too-large"}
    assert skipped(max_file_mb=3, allow_outside_paths=True) == {"huge.dcm": "not-dicom"}
