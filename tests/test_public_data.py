"""Public data as people have it: PNG/JPEG files read exactly as the sites' DICOM files are,
``load_public`` on .npz files, DICOM and PNG/JPEG folders, and ``fedmed predict`` on PNGs."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from fedmed.config import RunSettings
from fedmed.coordinator.model_card import model_card, model_card_markdown
from fedmed.data.dicom import LUMA_WEIGHTS, ReadOptions, read_dicom, resize_square
from fedmed.data.picture import PictureReadError, read_picture
from fedmed.data.public import load_public
from fedmed.data.report import SkipReason
from fedmed.data.site import SiteSource, load_site
from fedmed.model import ModelConfig, build_model
from fedmed.rundir import RunDirectory
from fedmed.weights import model_state
from tests.conftest import SHARED_DATA, tree_state, write_synthetic_site
from tests.federation_helpers import BIN, process_env

NIH_NPZ = SHARED_DATA / "nih-cxr-public-28.npz"
PNEUMONIA_NPZ = SHARED_DATA / "pneumoniamnist.npz"
OPTIONS = ReadOptions(image_size=32)


def _smooth(rows: int = 48, cols: int = 40, low: float = 30, high: float = 220, dtype=np.uint8) -> np.ndarray:
    """A smooth image that does not span its type's full range (a min-max stretch would show)."""
    y, x = np.mgrid[0:rows, 0:cols]
    wave = 0.5 + 0.25 * np.sin(x / 6.0) + 0.25 * np.cos(y / 9.0)  # in [0, 1]
    return np.rint(low + (high - low) * wave).astype(dtype)


def _write_dicom(path: Path, pixels: np.ndarray) -> Path:
    """A MONOCHROME2 file of ``pixels`` whose window spans the bit depth's full range, the way
    a PNG of the same pixels is read (DICOM PS3.3 C.11.2.1.2: v / (2**bits - 1))."""
    bits = pixels.dtype.itemsize * 8
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "PUBLIC-1"
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, "MONOCHROME2", bits)
    ds.WindowCenter, ds.WindowWidth = str(2 ** (bits - 1)), str(2**bits)
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path, format="PNG")
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_png_and_the_dicom_of_the_same_pixels_give_the_same_image(dtype, tmp_path):
    scale = 1 if dtype == np.uint8 else 257
    pixels = _smooth(low=30 * scale, high=220 * scale, dtype=dtype)
    if dtype == np.uint16:
        pixels = pixels + np.arange(pixels.size, dtype=np.uint16).reshape(pixels.shape) % 200  # below 8 bits
    png = read_picture(_write_png(tmp_path / "x.png", pixels), OPTIONS)
    dicom = read_dicom(_write_dicom(tmp_path / "x.dcm", pixels), OPTIONS).pixels
    assert png.shape == (32, 32) and png.dtype == np.float32
    np.testing.assert_allclose(png, dicom, rtol=0, atol=1 / 255)
    # by the bit depth, not stretched: the brightest pixel stays 220/255, the padding 0
    assert png.max() == pytest.approx(220 / 255, abs=0.01) and png[:, 0].max() == 0.0
    if dtype == np.uint16:  # kept at full depth: far closer than an 8-bit reduction
        eight_bit = resize_square(np.rint(pixels / 257.0) / 255.0, 32)
        assert np.abs(png - dicom).max() < 1e-5 < np.abs(png - eight_bit).max()


def test_colour_becomes_grey_with_fedmeds_luma_weights(tmp_path):
    rgb = np.stack([_smooth(), _smooth(low=0, high=90), 255 - _smooth()], axis=-1)
    got = read_picture(_write_png(tmp_path / "colour.png", rgb), OPTIONS)
    expected = resize_square((rgb.astype(np.float64) @ LUMA_WEIGHTS) / 255.0, 32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_a_jpeg_of_a_smooth_image_is_close_to_its_dicom(tmp_path):
    pixels = _smooth(96, 80)
    Image.fromarray(pixels).save(tmp_path / "x.jpg", format="JPEG", quality=85)
    jpeg = read_picture(tmp_path / "x.jpg", OPTIONS)
    dicom = read_dicom(_write_dicom(tmp_path / "x.dcm", pixels), OPTIONS).pixels
    assert np.abs(jpeg - dicom).mean() < 0.03


def _animated(path: Path) -> None:
    frames = [Image.fromarray(_smooth()), Image.fromarray(255 - _smooth())]
    frames[0].save(path, format="PNG", save_all=True, append_images=frames[1:])


@pytest.mark.parametrize("make,reason,detail", [
    (lambda p: p.write_text("not a picture\n"), SkipReason.DECODE_FAILED, "not a PNG or JPEG"),
    (lambda p: p.write_bytes(_write_png(p, _smooth()).read_bytes()[:300]), SkipReason.DECODE_FAILED, "truncated"),
    (_animated, SkipReason.MULTI_FRAME, "2 frames"),
    (lambda p: shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), p), SkipReason.DECODE_FAILED,
     "not a PNG or JPEG"),
])
def test_a_bad_picture_raises_an_error_naming_the_file_and_the_reason(make, reason, detail, tmp_path):
    path = tmp_path / "scan.png"
    make(path)
    with pytest.raises(PictureReadError) as caught:
        read_picture(path, OPTIONS)
    assert caught.value.reason == reason and str(path) in str(caught.value) and detail in caught.value.detail


def test_pillows_decompression_bomb_guard_refuses_a_huge_picture(tmp_path, monkeypatch):
    path = _write_png(tmp_path / "bomb.png", np.zeros((100, 100), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # 10,000 pixels: above the limit, below twice it
    with pytest.raises(PictureReadError) as caught:
        read_picture(path, OPTIONS)
    assert caught.value.reason == SkipReason.TOO_LARGE and "6,000 pixels" in caught.value.detail


def test_a_picture_folder_by_class_loads_with_labels_and_skips_what_fails(tmp_path):
    root = tmp_path / "public"
    (root / "normal").mkdir(parents=True)
    (root / "pneumonia" / "batch-2").mkdir(parents=True)
    _write_png(root / "normal" / "00000001_000.png", _smooth())
    Image.fromarray(_smooth(40, 48)).save(root / "normal" / "b.jpg", format="JPEG", quality=95)
    _write_png(root / "pneumonia" / "c.PNG", 255 - _smooth())
    _write_png(root / "pneumonia" / "batch-2" / "d.png", _smooth(high=250).astype(np.uint16) * 257)
    (root / "pneumonia" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (root / "normal" / ".DS_Store").write_bytes(bytes(64))
    os.mkfifo(root / "normal" / "pipe.png")  # never opened: reading it would block
    _write_png(root / "stray.png", _smooth())
    before = tree_state(root)  # (a FIFO is not a file to rglob's is_file)

    data = load_public(root, image_size=32)
    assert tree_state(root) == before, "public files are only read"
    assert data.classes == ("normal", "pneumonia") and len(data) == 4
    assert data.labels.tolist() == [0, 0, 1, 1] and data.images.shape == (4, 32, 32)
    np.testing.assert_array_equal(data.images[2], read_picture(root / "pneumonia" / "c.PNG", OPTIONS))
    assert data.patient_ids == ("00000001", "", "", ""), "NIH file names give the patient"
    reasons = {o.path: o.reason for o in data.skipped_files}
    assert reasons == {"pneumonia/corrupt.png": SkipReason.DECODE_FAILED, "normal/.DS_Store": SkipReason.HIDDEN_FILE,
                       "stray.png": SkipReason.OUTSIDE_CLASS_FOLDER, "normal/pipe.png": SkipReason.NOT_A_REGULAR_FILE}
    assert data.skipped == 4 and "4 images" in data.source


def test_a_dicom_folder_is_read_as_a_site_is_and_a_mixed_one_is_refused(tmp_path):
    root = write_synthetic_site(tmp_path / "public-dicom", n_images=12, size=32)
    data = load_public(root, image_size=32)
    site = load_site(SiteSource(root), OPTIONS)
    np.testing.assert_array_equal(data.images, site.images)
    assert data.patient_ids == tuple(site.patient_ids) and all(data.patient_ids) and "DICOM" in data.source
    _write_png(root / "normal" / "extra.png", _smooth())
    with pytest.raises(ValueError, match="1 PNG/JPEG files"):
        load_public(root, image_size=32)


def _needs(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"shared public data not found at {path} (set FEDMED_SHARED_DATA)")
    return path


def test_the_nih_public_npz_loads_with_patients_from_file_names():
    path = _needs(NIH_NPZ)
    data = load_public(path, image_size=28)
    with np.load(path) as raw:
        filenames, images = [str(f) for f in raw["filename"]], raw["images"]
    assert len(data) == 1993 and data.classes == ("class-0", "class-1") and data.skipped == 0
    assert data.patient_ids == tuple(name[:8] for name in filenames)
    assert len(set(data.patient_ids)) < len(data), "some patients have several images"
    np.testing.assert_array_equal(data.images, (images / 255.0).astype(np.float32))
    train, val = data.split_by_patient(0.2, seed=3)
    assert len(train) + len(val) == 1993 and 0.1 < len(val) / 1993 < 0.3
    assert not {data.patient_ids[i] for i in train} & {data.patient_ids[i] for i in val}
    bigger = load_public(path, classes=("no finding", "abnormal"), image_size=64)
    assert bigger.images.shape == (1993, 64, 64) and bigger.classes == ("no finding", "abnormal")


def test_a_medmnist_npz_gives_train_and_val_never_test():
    path = _needs(PNEUMONIA_NPZ)
    data = load_public(path, image_size=28)
    with np.load(path) as raw:
        expected = np.concatenate([raw["train_images"], raw["val_images"]]) / 255.0
        labels = np.concatenate([raw["train_labels"], raw["val_labels"]]).ravel()
    assert len(data) == 4708 + 524 and "test not used" in data.source
    np.testing.assert_array_equal(data.images, expected.astype(np.float32))
    np.testing.assert_array_equal(data.labels, labels)
    assert set(data.patient_ids) == {""}, "no patient ids in the file: unknown"


def _tiny_model_dir(tmp: Path) -> Path:
    run = RunSettings(run_id="public-test", depth=10, width=8, image_size=28)
    state = model_state(build_model(ModelConfig.from_settings(run), seed=11))
    card = model_card(run, {}, 1, None, weights=state)
    run_dir = RunDirectory(tmp / "run")
    run_dir.write_final_model(state, card, model_card_markdown(card))
    return run_dir.model_dir


@pytest.mark.slow
def test_predict_scores_a_png_as_it_scores_the_dicom_of_the_same_image(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    pixels = _smooth(120, 100)
    _write_png(folder / "scan.png", pixels)
    shutil.copy(folder / "scan.png", folder / "scan-without-suffix")  # found by its first bytes
    _write_dicom(folder / "scan.dcm", pixels)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    result = subprocess.run([str(BIN / "fedmed"), "predict", str(_tiny_model_dir(tmp_path)), str(folder),
                             "--out", str(tmp_path / "pred.csv"), "--quiet"],
                            capture_output=True, text=True, env=process_env(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "pred.csv"))}
    assert sorted(rows) == ["scan-without-suffix", "scan.dcm", "scan.png"]
    probabilities = {path: np.array([float(r["p_normal"]), float(r["p_pneumonia"])]) for path, r in rows.items()}
    np.testing.assert_allclose(probabilities["scan.png"], probabilities["scan.dcm"], rtol=0, atol=1e-3)
    np.testing.assert_allclose(probabilities["scan-without-suffix"], probabilities["scan.png"], rtol=0, atol=0)
    skipped = list(csv.DictReader(open(tmp_path / "pred-skipped.csv")))
    assert [(s["path"], s["reason"]) for s in skipped] == [("broken.jpg", "decode-failure")]
    assert "3 files scored, 1 skipped" in result.stdout
