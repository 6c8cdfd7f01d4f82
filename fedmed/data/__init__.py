"""Hospital data: DICOM reading, site datasets, caching, partitioning and export."""

from fedmed.data.dicom import DicomImage, DicomReadError, ReadOptions, read_dicom
from fedmed.data.imageset import ImageSet
from fedmed.data.report import FileOutcome, SkipReason, ValidationReport
from fedmed.data.site import SiteData, SiteSource, load_site

__all__ = [
    "DicomImage",
    "DicomReadError",
    "FileOutcome",
    "ImageSet",
    "ReadOptions",
    "SiteData",
    "SiteSource",
    "SkipReason",
    "ValidationReport",
    "load_site",
    "read_dicom",
]
