"""Hospital data: DICOM reading, site datasets, caching, partitioning and export; public
pre-training data (``.npz``, DICOM, PNG/JPEG)."""

from fedmed.data.dicom import DicomImage, DicomReadError, ReadOptions, read_dicom
from fedmed.data.imageset import ImageSet
from fedmed.data.picture import PictureReadError, read_picture
from fedmed.data.public import PublicData, load_public
from fedmed.data.report import FileOutcome, SkipReason, ValidationReport
from fedmed.data.site import SiteData, SiteSource, load_site

__all__ = [
    "DicomImage",
    "DicomReadError",
    "FileOutcome",
    "ImageSet",
    "PictureReadError",
    "PublicData",
    "ReadOptions",
    "SiteData",
    "SiteSource",
    "SkipReason",
    "ValidationReport",
    "load_public",
    "load_site",
    "read_picture",
    "read_dicom",
]
