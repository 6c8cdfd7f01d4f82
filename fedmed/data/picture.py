"""Read one PNG or JPEG file into the same normalised, square float32 image as a DICOM file.

Public data sets come as PNG or JPEG far more often than as DICOM, and a model pre-trained
on them must see images prepared exactly as the hospitals' DICOM files are (see
:mod:`fedmed.data.dicom`):

1. only regular files within ``ReadOptions.max_file_bytes`` are opened, read-only and
   without blocking (the same checks as DICOM files);
2. Pillow decodes the file; only its PNG and JPEG decoders are allowed, and its
   decompression-bomb guard (``PIL.Image.MAX_IMAGE_PIXELS``) refuses images whose pixel
   count would exhaust memory, at Pillow's warning threshold already;
3. animated PNGs and multi-picture JPEGs are refused (``multi-frame``), as multi-frame
   DICOM files are by default;
4. the EXIF orientation is applied, so the image is the one a viewer shows;
5. colour (RGB, palette, CMYK) becomes grey with fedmed's luma weights
   (:data:`fedmed.data.dicom.LUMA_WEIGHTS`); an alpha channel is dropped;
6. intensities are divided by the bit depth's maximum (255, or 65535 for 16-bit PNG, kept
   at full depth): never stretched by the image's own minimum and maximum, so a PNG and a
   DICOM file holding the same pixels (with a window over the full range) agree;
7. the image is zero-padded to a square and resized with
   :func:`fedmed.data.dicom.resize_square`.

Failures raise :class:`PictureReadError`, a :class:`DicomReadError` with a
:class:`SkipReason`, so every caller that reports skipped DICOM files reports these too.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fedmed.data.dicom import LUMA_WEIGHTS, DicomReadError, ReadOptions, check_file, resize_square
from fedmed.data.report import SkipReason

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
DICOM_MAGIC_OFFSET = 128  # 'DICM' follows the 128-byte preamble
SNIFF_BYTES = 132
PILLOW_FORMATS = ("PNG", "JPEG")


class PictureReadError(DicomReadError):
    """A PNG or JPEG file that cannot become an image, with the :class:`SkipReason` why."""


def read_picture(path: Path | str, options: ReadOptions = ReadOptions()) -> np.ndarray:
    """The preprocessed (image_size, image_size) float32 image in [0, 1] of a PNG or JPEG
    file, or raise :class:`PictureReadError` naming the file and the reason."""
    path = Path(path)
    data = _read_bytes(path, options.max_file_bytes)
    unit = _decode(path, data)
    return resize_square(unit, options.image_size)


def sniff(path: Path | str) -> str:
    """What a file's first bytes say it is: ``"png"``, ``"jpeg"``, ``"dicom"`` or ``""``.

    Only a regular file is opened (without blocking, so a named pipe cannot hang the
    caller); anything that cannot be read says ``""`` and is left to the reader's report.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return ""
        with _open_regular(Path(path)) as handle:
            header = handle.read(SNIFF_BYTES)
    except OSError:
        return ""
    if header.startswith(PNG_MAGIC):
        return "png"
    if header.startswith(JPEG_MAGIC):
        return "jpeg"
    if header[DICOM_MAGIC_OFFSET:SNIFF_BYTES] == b"DICM":
        return "dicom"
    return ""


def is_picture(path: Path | str) -> bool:
    """Whether ``path`` is to be read as PNG/JPEG: its first bytes say so, or (when they say
    neither picture nor DICOM) its suffix does, so a broken ``scan.png`` is reported as a
    picture that failed to decode rather than as a file that is not DICOM."""
    kind = sniff(path)
    if kind in ("png", "jpeg"):
        return True
    return kind == "" and Path(path).suffix.lower() in PICTURE_SUFFIXES


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    """The whole file, after the same kind and size checks as a DICOM file."""
    try:
        check_file(path, max_bytes)  # missing, not a regular file, too large: never opened
    except DicomReadError as exc:
        raise PictureReadError(path, exc.reason, exc.detail) from None
    try:
        with _open_regular(path) as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):  # swapped since the stat
                raise PictureReadError(
                    path,
                    SkipReason.NOT_A_REGULAR_FILE,
                    "no longer a regular file when opened; only regular files are read",
                )
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise PictureReadError(path, SkipReason.UNREADABLE, _short(exc)) from exc
    if len(data) > max_bytes:  # grew since the stat
        raise PictureReadError(
            path, SkipReason.TOO_LARGE, f"above the limit of {max_bytes:,} bytes (site.max_file_mb, --max-file-mb)"
        )
    return data


def _open_regular(path: Path) -> io.BufferedReader:
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.fdopen(os.open(path, flags), "rb")


def _decode(path: Path, data: bytes) -> np.ndarray:
    """Decode ``data`` with Pillow and map it to [0, 1] grey by its bit depth."""
    with warnings.catch_warnings():
        # Pillow only warns between its pixel limit and twice that; fedmed refuses both.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    raise PictureReadError(
                        path,
                        SkipReason.MULTI_FRAME,
                        f"{image.format} with {frames} frames; fedmed reads single images "
                        "(save the frame you want as a file of its own)",
                    )
                image.load()
                return _to_unit_range(ImageOps.exif_transpose(image))
        except PictureReadError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise PictureReadError(
                path,
                SkipReason.TOO_LARGE,
                f"{_short(exc)}; Pillow's decompression-bomb limit is {Image.MAX_IMAGE_PIXELS:,} pixels",
            ) from exc
        except Image.UnidentifiedImageError as exc:
            raise PictureReadError(
                path, SkipReason.DECODE_FAILED, "not a PNG or JPEG image (Pillow cannot identify it)"
            ) from exc
        except Exception as exc:  # truncated data, corrupt chunks, unsupported modes
            raise PictureReadError(path, SkipReason.DECODE_FAILED, _short(exc)) from exc


def _to_unit_range(image: Image.Image) -> np.ndarray:
    """Grey values in [0, 1]: 16-bit grey over 65535, everything else over 255."""
    if image.mode.startswith("I"):  # PNG's only deeper mode is 16-bit grey ("I;16", or "I")
        return np.asarray(image, dtype=np.float64) / 65535.0
    if image.mode in ("L", "LA", "La", "1"):
        return np.asarray(image.convert("L"), dtype=np.float64) / 255.0
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)  # palette, CMYK, YCbCr; alpha dropped
    return (rgb @ LUMA_WEIGHTS) / 255.0


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
