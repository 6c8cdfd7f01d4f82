"""Read one DICOM file into a normalised, square float32 image.

The pipeline, in order:

1. decode the pixel data (compressed transfer syntaxes through pydicom's plugins);
2. multi-frame files are rejected, or reduced to their middle frame (``multiframe="middle"``);
3. colour images (RGB, YBR_*, PALETTE COLOR) become grey with ITU-R BT.601 luma weights;
4. grey images get the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence);
5. intensities are mapped to [0, 1]: through the file's VOI LUT Sequence or its first
   Window Center/Width when present (the display the radiologist sees), otherwise by the
   image's own minimum and maximum;
6. MONOCHROME1 images are inverted, so 1.0 is always the brightest display value;
7. the image is zero-padded to a square (keeping its aspect ratio) and resized to
   ``image_size`` with antialiased bilinear interpolation.

Files are opened read-only; nothing is ever written back.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fedmed.data.report import SkipReason

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
MULTIFRAME_POLICIES = ("reject", "middle")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class ReadOptions:
    """How every image of a site is preprocessed; part of the cache key."""

    image_size: int = 64
    multiframe: str = "reject"

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 8 and 1024 pixels, got {self.image_size}")
        if self.multiframe not in MULTIFRAME_POLICIES:
            raise ValueError(
                f"multiframe must be one of {', '.join(MULTIFRAME_POLICIES)}, got {self.multiframe!r}"
            )


@dataclass(frozen=True)
class DicomImage:
    """A decoded image and the identifiers the site dataset needs."""

    pixels: np.ndarray  # float32, (image_size, image_size), values in [0, 1]
    sop_instance_uid: str
    patient_id: str


class DicomReadError(Exception):
    """A file that cannot become a training image, with the reason why."""

    def __init__(self, path: Path | str, reason: SkipReason, detail: str) -> None:
        super().__init__(f"{path}: {reason.value}: {detail}")
        self.path = str(path)
        self.reason = reason
        self.detail = detail


def read_dicom(path: Path | str, options: ReadOptions = ReadOptions()) -> DicomImage:
    """Read ``path`` and return its preprocessed image, or raise :class:`DicomReadError`."""
    with warnings.catch_warnings():
        # pydicom warns about every oddity it works around; the outcome is what we report.
        warnings.simplefilter("ignore")
        return _read(Path(path), options)


def _read(path: Path, options: ReadOptions) -> DicomImage:
    ds = _read_dataset(path)
    frames = _frame_count(ds)
    if frames > 1 and options.multiframe == "reject":
        raise DicomReadError(
            path,
            SkipReason.MULTI_FRAME,
            f"{frames} frames; fedmed trains on single images "
            "(use multiframe='middle' to take the middle frame)",
        )
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in GREY + COLOUR:
        raise DicomReadError(
            path,
            SkipReason.UNSUPPORTED_PHOTOMETRIC,
            f"(0028,0004) Photometric Interpretation is {photometric or 'missing'}; "
            f"supported: {', '.join(GREY + COLOUR)}",
        )
    try:
        pixels = _decode(ds, frames)
        unit = _to_unit_range(ds, pixels, photometric)
    except DicomReadError:
        raise
    except Exception as exc:  # every decoder and LUT failure means "cannot use this file"
        raise DicomReadError(path, SkipReason.DECODE_FAILED, _short(exc)) from exc
    return DicomImage(
        pixels=resize_square(unit, options.image_size),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")).strip(),
        patient_id=str(ds.get("PatientID", "")).strip(),
    )


def _read_dataset(path: Path) -> pydicom.Dataset:
    """Parse the file read-only; accept legacy files without the 'DICM' preamble."""
    try:
        with open(path, "rb") as handle:
            try:
                ds = pydicom.dcmread(handle)
            except InvalidDicomError:
                handle.seek(0)
                ds = _read_without_preamble(handle, path)
    except OSError as exc:
        raise DicomReadError(path, SkipReason.UNREADABLE, _short(exc)) from exc
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(path, SkipReason.INVALID_HEADER, _short(exc)) from exc
    if "PixelData" not in ds:
        kind = str(ds.get("Modality", "")) or str(ds.get("SOPClassUID", "unknown"))
        raise DicomReadError(
            path, SkipReason.NO_PIXEL_DATA, f"(7FE0,0010) Pixel Data is absent (object: {kind})"
        )
    return ds


def _read_without_preamble(handle, path: Path) -> pydicom.Dataset:
    """Some old files start straight with their data elements; accept them only if they
    parse into a real DICOM object (a SOP Class UID or pixel data)."""
    not_dicom = DicomReadError(
        path, SkipReason.NOT_DICOM, "no 'DICM' prefix and no DICOM data elements found"
    )
    try:
        ds = pydicom.dcmread(handle, force=True)
    except Exception as exc:
        raise not_dicom from exc
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise not_dicom
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit = ds.original_encoding[0] if ds.original_encoding else True
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        )
    return ds


def _frame_count(ds: pydicom.Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


def _decode(ds: pydicom.Dataset, frames: int) -> np.ndarray:
    """The stored values of the one frame fedmed uses, colour converted to RGB."""
    pixels = ds.pixel_array
    if frames > 1:
        pixels = pixels[frames // 2]
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    return pixels


def _to_unit_range(ds: pydicom.Dataset, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """Map decoded values to [0, 1] display intensities (see the module docstring)."""
    if pixels.ndim == 3:  # colour: (rows, columns, 3) RGB after decoding
        return _min_max(pixels.astype(np.float64) @ LUMA_WEIGHTS)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if "VOILUTSequence" in ds:
        lut = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        shown = apply_voi_lut(values, ds, index=0, prefer_lut=True).astype(np.float64)
        unit = _scale(shown, lut.min(), lut.max())
    elif (window := _window(ds)) is not None:
        unit = _apply_window(values, *window)
    else:
        unit = _min_max(values)
    return 1.0 - unit if photometric == "MONOCHROME1" else unit


def _window(ds: pydicom.Dataset) -> tuple[float, float, str] | None:
    """The first (center, width, function) of the file, or None when absent or unusable."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return None
    try:
        center = float(_first(ds.WindowCenter))
        width = float(_first(ds.WindowWidth))
    except (TypeError, ValueError):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper() or "LINEAR"
    if width <= 0 or (function == "LINEAR" and width < 1):
        return None
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _first(value):
    return value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value


def _scale(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros_like(values)
    return np.clip((values - low) / (high - low), 0.0, 1.0)


def _min_max(values: np.ndarray) -> np.ndarray:
    return _scale(values, float(values.min()), float(values.max()))


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad ``image`` to a centred square, then resize it to ``size`` x ``size``."""
    rows, cols = image.shape
    side = max(rows, cols)
    if rows != cols:
        square = np.zeros((side, side), dtype=image.dtype)
        top, left = (side - rows) // 2, (side - cols) // 2
        square[top : top + rows, left : left + cols] = image
        image = square
    if side != size:
        # Pillow's bilinear filter widens with the scale factor, so downsizing is antialiased.
        as_float = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32))
        image = np.asarray(as_float.resize((size, size), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
