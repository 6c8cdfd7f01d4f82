"""Write image sets as hospital DICOM folders whose headers differ the way real sites do.

Each site gets one :class:`DicomStyle`. Pixel value ``p`` (0..255) is stored as
``offset + scale * p`` (``255 - p`` first for MONOCHROME1), so the reader's output is known
exactly: ``p / 255`` for a windowed style (its window spans the stored range) and the
image's min-max normalisation of ``p`` for the others.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless, generate_uid

from fedmed.data.imageset import ImageSet

DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")


@dataclass(frozen=True)
class DicomStyle:
    """How one site stores its images."""

    name: str
    manufacturer: str
    photometric: str = "MONOCHROME2"
    bits_stored: int = 8
    signed: bool = False
    scale: int = 1
    offset: int = 0
    rescale: tuple[float, float] | None = None  # (slope, intercept)
    window: tuple[float, float] | None = None  # (center, width)
    transfer_syntax: UID = ExplicitVRLittleEndian

    @property
    def bits_allocated(self) -> int:
        return 8 if self.bits_stored <= 8 else 16

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """Stored values for 8-bit display pixels."""
        values = 255 - pixels.astype(np.int64) if self.photometric == "MONOCHROME1" else pixels.astype(np.int64)
        stored = self.offset + self.scale * values
        dtype = {(8, False): np.uint8, (16, False): np.uint16, (16, True): np.int16}[(self.bits_allocated, self.signed)]
        low, high = (
            (-(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1)
            if self.signed
            else (0, 2**self.bits_stored - 1)
        )
        if stored.min() < low or stored.max() > high:
            raise ValueError(f"style {self.name}: stored values leave the {self.bits_stored}-bit range")
        return stored.astype(dtype)


SITE_STYLES = (
    DicomStyle("plain-8bit", manufacturer="Acme Radiography"),
    DicomStyle(
        "monochrome1-16bit", manufacturer="Borealis Imaging", photometric="MONOCHROME1", bits_stored=16, scale=257
    ),
    DicomStyle(
        "signed-12bit-rescaled",
        manufacturer="Cobalt Medical",
        bits_stored=12,
        signed=True,
        scale=8,
        offset=-1020,
        rescale=(0.5, 600.0),
    ),
    DicomStyle(
        "windowed-16bit-rle",
        manufacturer="Delta Diagnostics",
        bits_stored=16,
        scale=4,
        offset=1000,
        # DICOM linear window: stored 1000 shows as 0.0, stored 2020 (p = 255) as 1.0.
        window=(1510.5, 1021.0),
        transfer_syntax=RLELossless,
    ),
)


def export_site(images: ImageSet, out_dir: Path, site_name: str, style: DicomStyle, seed: int = 0) -> list[Path]:
    """Write ``images`` as ``out_dir/<class>/<patient>-<n>.dcm``; ``out_dir`` must be new or empty."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; fedmed never overwrites existing files, choose a new folder")
    study_date = datetime.date(2024, 1, 1) + datetime.timedelta(days=seed % 365)
    written: list[Path] = []
    per_patient: dict[str, int] = {}
    for index in range(len(images)):
        patient = images.patient_ids[index]
        number = per_patient[patient] = per_patient.get(patient, 0) + 1
        ds = _dataset(images.images[index], style, site=site_name, patient=patient, number=number, date=study_date)
        uid_source = [site_name, str(seed), str(index)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=uid_source)
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[site_name, str(seed), patient, "study"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[site_name, str(seed), patient, "series"])
        if style.transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(style.transfer_syntax)
        path = out_dir / images.classes[images.labels[index]] / f"{_safe(patient)}-{number}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _dataset(
    pixels: np.ndarray, style: DicomStyle, *, site: str, patient: str, number: int, date: datetime.date
) -> pydicom.Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.Modality = "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = style.manufacturer
    ds.InstitutionName = site
    ds.PatientID = patient
    ds.PatientName = f"ANON^{patient}"
    ds.StudyDate = ds.ContentDate = date.strftime("%Y%m%d")
    ds.InstanceNumber = number
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    stored = style.encode(pixels)
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = style.photometric
    ds.BitsAllocated = style.bits_allocated
    ds.BitsStored = style.bits_stored
    ds.HighBit = style.bits_stored - 1
    ds.PixelRepresentation = int(style.signed)
    if style.rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = (f"{v:g}" for v in style.rescale)
        ds.RescaleType = "US"
    if style.window is not None:
        ds.WindowCenter, ds.WindowWidth = (f"{v:g}" for v in style.window)
    ds.PixelData = stored.tobytes()
    return ds


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)
