"""The DICOM reader on real files shipped with pydicom."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fedmed.data.dicom import DicomReadError, ReadOptions, read_dicom
from fedmed.data.report import SkipReason
from tests.conftest import pydicom_file


def native(name: str) -> ReadOptions:
    ds = pydicom.dcmread(pydicom_file(name), stop_before_pixels=True)
    assert ds.Rows == ds.Columns
    return ReadOptions(image_size=int(ds.Rows))


def saved_copy(tmp_path: Path, name: str, **changes) -> Path:
    ds = pydicom.dcmread(pydicom_file(name))
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    out = tmp_path / f"changed-{Path(name).name}"
    ds.save_as(out)
    return out


def dicom_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 linear window, scaled to [0, 1]."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    out = ((values - (center - 0.5)) / (width - 1) + 0.5)
    return np.where(values <= low, 0.0, np.where(values > high, 1.0, out))


@pytest.mark.parametrize("size", [28, 64, 128, 224])
def test_output_is_square_float32_in_unit_range(size):
    image = read_dicom(pydicom_file("CT_small.dcm"), ReadOptions(image_size=size))
    assert image.pixels.shape == (size, size)
    assert image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0
    assert image.patient_id == "1CT1"
    assert image.sop_instance_uid


def test_ct_rescale_slope_and_intercept_are_applied(tmp_path):
    ds = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    assert ds.PixelRepresentation == 1 and "RescaleSlope" in ds
    original = read_dicom(pydicom_file("CT_small.dcm"), native("CT_small.dcm")).pixels
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(original, (hu - hu.min()) / (hu.max() - hu.min()), atol=1e-6)
    # A negative slope turns the modality values around: the output must follow.
    flipped = read_dicom(saved_copy(tmp_path, "CT_small.dcm", RescaleSlope="-1"), native("CT_small.dcm")).pixels
    np.testing.assert_allclose(flipped, 1.0 - original, atol=1e-6)


def test_mr_window_center_and_width_are_applied():
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    image = read_dicom(pydicom_file("MR_small.dcm"), native("MR_small.dcm")).pixels
    expected = dicom_window(ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(image, expected, atol=1e-6)
    assert (image == 1.0).any(), "the window should saturate the brightest tissue"


def test_voi_lut_sequence_is_preferred_over_the_window(tmp_path):
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new("LUTData", "US", list(range(4095, -1, -1)))  # an inverting table
    ds.VOILUTSequence = Sequence([item])
    path = tmp_path / "mr-voi-lut.dcm"
    ds.save_as(path)
    image = read_dicom(path, ReadOptions(image_size=64)).pixels
    stored = np.clip(ds.pixel_array.astype(np.float64), 0, 4095)
    np.testing.assert_allclose(image, (4095 - stored) / 4095, atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    name = "dicomdirtests/77654033/CR1/6154"
    ds = pydicom.dcmread(pydicom_file(name), stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12
    options = ReadOptions(image_size=64)
    as_stored = read_dicom(pydicom_file(name), options).pixels
    as_mono2 = read_dicom(saved_copy(tmp_path, name, PhotometricInterpretation="MONOCHROME2"), options).pixels
    np.testing.assert_allclose(as_stored, 1.0 - as_mono2, atol=1e-6)


@pytest.mark.parametrize(
    "compressed", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm"]
)
def test_lossless_encodings_decode_to_the_same_image(compressed):
    reference = read_dicom(pydicom_file("MR_small.dcm")).pixels
    np.testing.assert_array_equal(read_dicom(pydicom_file(compressed)).pixels, reference)


def test_jpeg_baseline_colour_matches_the_uncompressed_original():
    # The same RGB test image, stored lossy-JPEG (YBR_FULL) and lossless RLE.
    jpeg = read_dicom(pydicom_file("SC_rgb_jpeg_dcmtk.dcm")).pixels
    rle = read_dicom(pydicom_file("SC_rgb_rle.dcm")).pixels
    assert np.abs(jpeg - rle).mean() < 0.02
    assert jpeg.std() > 0.1


@pytest.mark.parametrize("name", ["JPGExtended.dcm", "693_J2KI.dcm", "SC_rgb_jpeg_gdcm.dcm", "examples_palette.dcm"])
def test_other_compressed_and_colour_files_read(name):
    pixels = read_dicom(pydicom_file(name)).pixels
    assert pixels.shape == (64, 64) and pixels.std() > 0.01


def test_signed_12_bit_image_reads():
    ds = pydicom.dcmread(pydicom_file("J2K_pixelrep_mismatch.dcm"), stop_before_pixels=True)
    assert ds.BitsStored == 13 and ds.PixelRepresentation == 1
    assert read_dicom(pydicom_file("J2K_pixelrep_mismatch.dcm")).pixels.std() > 0.01


def test_non_square_images_are_padded_not_stretched(tmp_path):
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    narrow = np.ascontiguousarray(ds.pixel_array[:, 16:48])  # 64 rows x 32 columns
    ds.Columns = 32
    ds.PixelData = narrow.tobytes()
    path = tmp_path / "narrow.dcm"
    ds.save_as(path)
    pixels = read_dicom(path, ReadOptions(image_size=64)).pixels
    assert pixels.shape == (64, 64)
    assert not pixels[:, :16].any() and not pixels[:, 48:].any()
    expected = dicom_window(narrow.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(pixels[:, 16:48], expected, atol=1e-6)


def test_multi_frame_is_rejected_by_default_and_middle_frame_on_request():
    path = pydicom_file("examples_ybr_color.dcm")
    with pytest.raises(DicomReadError) as caught:
        read_dicom(path)
    assert caught.value.reason is SkipReason.MULTI_FRAME and "30 frames" in caught.value.detail
    middle = read_dicom(path, ReadOptions(multiframe="middle")).pixels
    assert middle.shape == (64, 64) and middle.std() > 0.01


@pytest.mark.parametrize(
    "name, reason",
    [
        ("rtplan.dcm", SkipReason.NO_PIXEL_DATA),
        ("waveform_ecg.dcm", SkipReason.NO_PIXEL_DATA),
        ("ExplVR_LitEndNoMeta.dcm", SkipReason.NO_PIXEL_DATA),
        ("README.txt", SkipReason.NOT_DICOM),
        ("zipMR.gz", SkipReason.NOT_DICOM),
        ("MR_truncated.dcm", SkipReason.DECODE_FAILED),
        ("meta_missing_tsyntax.dcm", SkipReason.UNSUPPORTED_PHOTOMETRIC),
    ],
)
def test_unusable_files_are_rejected_with_the_right_reason(name, reason):
    with pytest.raises(DicomReadError) as caught:
        read_dicom(pydicom_file(name))
    assert caught.value.reason is reason
    assert name.split("/")[-1] in str(caught.value)
    assert caught.value.detail


def test_unreadable_file_is_reported(tmp_path):
    with pytest.raises(DicomReadError) as caught:
        read_dicom(tmp_path / "absent.dcm")
    assert caught.value.reason is SkipReason.UNREADABLE


@pytest.mark.parametrize("bad", [dict(image_size=4), dict(multiframe="all")])
def test_bad_options_are_refused_with_a_message(bad):
    with pytest.raises(ValueError, match="image_size|multiframe"):
        ReadOptions(**bad)
