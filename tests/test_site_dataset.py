"""Site datasets: every file reported, bad files skipped, sources left untouched."""

import os
import stat

import numpy as np
import pytest

from fedmed.data import SiteSource, SkipReason, load_site
from fedmed.data.split import split_by_patient
from tests.conftest import tree_state, write_synthetic_site


def reasons_by_path(report):
    return {o.path: o.reason for o in report.outcomes}


def test_bad_files_are_reported_and_skipped_and_the_rest_loads(mixed_site):
    good = sorted(str(p.relative_to(mixed_site)) for p in mixed_site.glob("*/SYN*.dcm"))
    site = load_site(SiteSource(mixed_site, classes=("normal", "pneumonia")))
    reasons = reasons_by_path(site.report)
    assert reasons["normal/notes.txt"] is SkipReason.NOT_DICOM
    assert reasons["pneumonia/truncated.dcm"] is SkipReason.DECODE_FAILED
    assert reasons["normal/rtplan.dcm"] is SkipReason.NO_PIXEL_DATA
    assert reasons["normal/cine.dcm"] is SkipReason.MULTI_FRAME
    assert reasons["normal/corrupt.dcm"] in (
        SkipReason.INVALID_HEADER, SkipReason.NO_PIXEL_DATA, SkipReason.DECODE_FAILED, SkipReason.NOT_DICOM
    )
    assert reasons["normal/zz-copy.dcm"] is SkipReason.DUPLICATE_SOP_INSTANCE
    assert reasons["edema/case.dcm"] is SkipReason.UNKNOWN_LABEL
    assert reasons["README.txt"] is SkipReason.OUTSIDE_CLASS_FOLDER
    assert sorted(site.paths) == good
    assert len(site) == len(good) == len(site.report.used)
    assert site.images.shape == (len(good), 64, 64)
    assert site.report.class_counts() == {
        "normal": sum(p.startswith("normal/") for p in good),
        "pneumonia": sum(p.startswith("pneumonia/") for p in good),
    }
    text = site.report.to_text()
    for path in ("normal/notes.txt", "pneumonia/truncated.dcm", "edema/case.dcm"):
        assert path in text


def test_source_tree_is_byte_for_byte_unchanged(mixed_site, tmp_path):
    before = tree_state(mixed_site)
    for path in mixed_site.rglob("*"):  # a write attempt would now fail loudly
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP)
    load_site(SiteSource(mixed_site, classes=("normal", "pneumonia")), cache_dir=tmp_path / "cache")
    load_site(SiteSource(mixed_site, classes=("normal", "pneumonia")), cache_dir=tmp_path / "cache")
    assert tree_state(mixed_site) == before
    assert not any((tmp_path / "cache").rglob("*.dcm"))


def test_classes_default_to_the_folders_found(mixed_site):
    site = load_site(SiteSource(mixed_site))
    assert site.classes == ("edema", "normal", "pneumonia")
    duplicates = [o for o in site.report.skipped if o.reason is SkipReason.DUPLICATE_SOP_INSTANCE]
    assert len(duplicates) == 2  # edema/case.dcm comes first now; its original and zz-copy are the repeats
    assert reasons_by_path(site.report)["edema/case.dcm"] is None


def test_labels_follow_the_class_order_given(synthetic_site):
    forward = load_site(SiteSource(synthetic_site, classes=("normal", "pneumonia")))
    backward = load_site(SiteSource(synthetic_site, classes=("pneumonia", "normal")))
    assert forward.paths == backward.paths
    np.testing.assert_array_equal(forward.labels, 1 - backward.labels)
    for path, label in zip(forward.paths, forward.labels):
        assert path.startswith(forward.classes[label] + "/")


def test_manifest_layout(synthetic_site, tmp_path):
    files = sorted(synthetic_site.rglob("*.dcm"))
    lines = ["path,label,patient_id"]
    for i, path in enumerate(files):
        lines.append(f"{os.path.relpath(path, tmp_path)},{path.parent.name},P{i // 2}")
    lines.append("missing/file.dcm,normal,P99")
    lines.append(f"{os.path.relpath(files[0], tmp_path)},fracture,P98")
    manifest = tmp_path / "site.csv"
    manifest.write_text("\n".join(lines) + "\n")
    site = load_site(SiteSource.from_path(manifest, classes=("normal", "pneumonia")))
    skipped = {(o.path, o.label): o.reason for o in site.report.skipped}
    assert skipped == {
        ("missing/file.dcm", "normal"): SkipReason.MISSING_FILE,
        (os.path.relpath(files[0], tmp_path), "fracture"): SkipReason.UNKNOWN_LABEL,
    }
    assert len(site) == len(files)
    assert set(site.patient_ids) == {f"P{i // 2}" for i in range(len(files))}


def test_manifest_without_the_needed_columns_is_refused_with_its_name(tmp_path):
    manifest = tmp_path / "bad.csv"
    manifest.write_text("file,diagnosis\na.dcm,normal\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*path,label.*missing path, label"):
        load_site(SiteSource.from_path(manifest))


def test_missing_site_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SiteSource.from_path(tmp_path / "nowhere")


def test_patient_split_keeps_each_patient_on_one_side(tmp_path):
    root = write_synthetic_site(tmp_path / "site", n_images=60)
    site = load_site(SiteSource(root))
    assert len(set(site.patient_ids)) < len(site), "synthetic patients have several images"
    train, val = site.split(val_fraction=0.25, seed=3)
    assert len(train) + len(val) == len(site) and len(val) > 0
    train_patients = {site.patient_ids[i] for i in train}
    assert not train_patients & {site.patient_ids[i] for i in val}
    assert set(site.labels[val]) == {0, 1}, "stratified: both classes in validation"
    again = site.split(val_fraction=0.25, seed=3)
    np.testing.assert_array_equal(val, again[1])
    other = site.split(val_fraction=0.25, seed=4)
    assert not np.array_equal(val, other[1])


def test_images_without_patient_id_are_their_own_patients():
    labels = np.array([0, 0, 1, 1, 0, 1, 0, 1])
    train, val = split_by_patient(labels, [""] * 8, val_fraction=0.5, seed=0)
    assert len(val) == 4 and sorted(np.concatenate([train, val]).tolist()) == list(range(8))
