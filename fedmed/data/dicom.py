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

Files are opened read-only; nothing is ever written back. Before anything is parsed, a file
must be a regular file (never a FIFO, device or socket, which can block or never end) no
larger than ``ReadOptions.max_file_bytes``, and a file without the 'DICM' prefix is parsed
only when its first bytes are DICOM data elements: a hostile or stray file costs a stat and
a few kilobytes read, never a hang or its whole size in memory.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from fedmed.data.report import SkipReason

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR")
MULTIFRAME_POLICIES = ("reject", "middle")
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
MB = 1_000_000  # the unit of the site setting site.max_file_mb
DEFAULT_MAX_FILE_BYTES = 512 * MB  # a large uncompressed chest X-ray is tens of MB
HEADER_BYTES = 8192  # what is read to decide whether a file is DICOM at all
FIRST_GROUPS = (0x0002, 0x0008)  # a preamble-less file starts with its meta or identifying group
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # 4-byte lengths
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class ReadOptions:
    """How every image of a site is read. ``image_size`` and ``multiframe`` are part of
    the cache key; ``max_file_bytes`` (site.max_file_mb) is checked before the cache is."""

    image_size: int = 64
    multiframe: str = "reject"
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __post_init__(self) -> None:
        if not 8 <= self.image_size <= 1024:
            raise ValueError(f"image_size must be between 8 and 1024 pixels, got {self.image_size}")
        if self.max_file_bytes < 1:
            raise ValueError(f"max_file_bytes must be at least 1 byte, got {self.max_file_bytes}")
        if self.multiframe not in MULTIFRAME_POLICIES:
            raise ValueError(f"multiframe must be one of {', '.join(MULTIFRAME_POLICIES)}, got {self.multiframe!r}")


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


def check_file(path: Path | str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> os.stat_result:
    """Stat ``path`` (following links) without opening it; raise :class:`DicomReadError`
    for what must not be opened: nothing there, not a regular file, or too large."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        detail = "no such file" + (" (a link to nothing)" if os.path.islink(path) else "")
        raise DicomReadError(path, SkipReason.MISSING_FILE, detail) from None
    except OSError as exc:
        raise DicomReadError(path, SkipReason.UNREADABLE, _short(exc)) from exc
    _check_kind_and_size(path, info, max_bytes)
    return info


def _check_kind_and_size(path: Path | str, info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        link = " (through a link)" if os.path.islink(path) else ""
        raise DicomReadError(
            path,
            SkipReason.NOT_A_REGULAR_FILE,
            f"{_kind(info.st_mode)}{link}, not a regular file; only regular files are read",
        )
    if info.st_size > max_bytes:
        raise DicomReadError(
            path,
            SkipReason.TOO_LARGE,
            f"{_megabytes(info.st_size)} is above the limit of {_megabytes(max_bytes)}; "
            "raise site.max_file_mb (--max-file-mb) if the site really has files this large",
        )


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return name
    return f"a special file (mode {stat.filemode(mode)})"


def _megabytes(size: int) -> str:
    return f"{size / MB:,.1f} MB ({size:,} bytes)"


def _read(path: Path, options: ReadOptions) -> DicomImage:
    ds = _read_dataset(path, options.max_file_bytes)
    frames = _frame_count(ds)
    if frames > 1 and options.multiframe == "reject":
        raise DicomReadError(
            path,
            SkipReason.MULTI_FRAME,
            f"{frames} frames; fedmed trains on single images (use multiframe='middle' to take the middle frame)",
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


def _read_dataset(path: Path, max_bytes: int) -> pydicom.Dataset:
    """Parse the file read-only; accept legacy files without the 'DICM' preamble."""
    ds: pydicom.Dataset  # a FileDataset from a file with the preamble
    try:
        with _open_regular(path, max_bytes) as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(HEADER_BYTES)
            handle.seek(0)
            if header[128:132] == b"DICM":
                _check_dataset_start(header, path)
                ds = pydicom.dcmread(handle)
            elif _looks_like_data_elements(header, size):
                ds = _read_without_preamble(handle, path)
            else:  # never handed to pydicom's force mode, which would parse all of it
                raise DicomReadError(path, SkipReason.NOT_DICOM, NOT_DICOM_DETAIL)
    except OSError as exc:
        raise DicomReadError(path, SkipReason.UNREADABLE, _short(exc)) from exc
    except DicomReadError:
        raise
    except Exception as exc:
        raise DicomReadError(path, SkipReason.INVALID_HEADER, _short(exc)) from exc
    if "PixelData" not in ds:
        kind = str(ds.get("Modality", "")) or str(ds.get("SOPClassUID", "unknown"))
        raise DicomReadError(path, SkipReason.NO_PIXEL_DATA, f"(7FE0,0010) Pixel Data is absent (object: {kind})")
    return ds


NOT_DICOM_DETAIL = "no 'DICM' prefix and no DICOM data elements found"


def _open_regular(path: Path, max_bytes: int) -> BinaryIO:
    """Open for reading without blocking (a FIFO swapped in after :func:`check_file` must
    not hang the site), then refuse anything but a regular file within the size limit."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0))
    try:
        _check_kind_and_size(path, os.fstat(fd), max_bytes)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _looks_like_data_elements(header: bytes, size: int) -> bool:
    """Whether a file without the 'DICM' prefix starts with DICOM data elements: its first
    tag in group 0002 or 0008, then elements with ascending tags and lengths that fit the
    file, in either byte order. All-zero, text and random files fail on the first bytes."""
    return any(_elements_fit(header, size, endian) for endian in "<>")


def _elements_fit(header: bytes, size: int, endian: str, most: int = 16) -> bool:
    offset, previous, explicit = 0, -1, None
    for _ in range(most):
        if offset + 8 > len(header):
            break
        group, element = struct.unpack_from(endian + "HH", header, offset)
        tag = group << 16 | element
        if (previous < 0 and group not in FIRST_GROUPS) or tag <= previous:
            return False
        vr = header[offset + 4 : offset + 6]
        if explicit is None or (previous >> 16 == 0x0002 and group != 0x0002):
            explicit = vr in SHORT_VRS or vr in LONG_VRS  # the meta group is always explicit VR
        if explicit and vr in SHORT_VRS:
            (length,) = struct.unpack_from(endian + "H", header, offset + 6)
            start = offset + 8
        elif explicit and vr in LONG_VRS:
            if offset + 12 > len(header):
                break
            (length,) = struct.unpack_from(endian + "L", header, offset + 8)
            start = offset + 12
        elif explicit:
            return False  # an explicit-VR file with an unknown VR
        else:
            (length,) = struct.unpack_from(endian + "L", header, offset + 4)
            start = offset + 8
        previous = tag
        if length == UNDEFINED_LENGTH:
            break  # a sequence or encapsulated data: what came before was consistent
        if start + length > size:
            return False
        offset = start + length
    return previous >= 0


def _check_dataset_start(header: bytes, path: Path) -> None:
    """A 'DICM' file whose data set starts with zero bytes would keep pydicom parsing empty
    elements to its end; refuse it when the header shows that."""
    offset = 132
    while offset + 12 <= len(header) and header[offset : offset + 2] == b"\x02\x00":
        vr = header[offset + 4 : offset + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<L", header, offset + 8)
            offset += 12 + length
        elif vr in SHORT_VRS:
            (length,) = struct.unpack_from("<H", header, offset + 6)
            offset += 8 + length
        else:
            return  # not the usual explicit-VR meta group: pydicom decides
    if offset + 8 <= len(header) and header[offset : offset + 8] == bytes(8):
        raise DicomReadError(
            path, SkipReason.INVALID_HEADER, f"no data element after the 'DICM' prefix (zero bytes at {offset})"
        )


def _read_without_preamble(handle, path: Path) -> pydicom.Dataset:
    """Some old files start straight with their data elements; accept them only if they
    parse into a real DICOM object (a SOP Class UID or pixel data)."""
    not_dicom = DicomReadError(path, SkipReason.NOT_DICOM, NOT_DICOM_DETAIL)
    try:
        ds = pydicom.dcmread(handle, force=True)
    except Exception as exc:
        raise not_dicom from exc
    if "SOPClassUID" not in ds and "PixelData" not in ds:
        raise not_dicom
    if "TransferSyntaxUID" not in ds.file_meta:
        implicit = ds.original_encoding[0] if ds.original_encoding else True
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
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
