"""A site's data as the ClientApp uses it: read through the preprocessing cache and split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmed.config import RunSettings, SiteSettings
from fedmed.data.cache import default_cache_dir
from fedmed.data.dicom import MB, ReadOptions
from fedmed.data.site import SiteData, SiteSource, load_site


@dataclass
class SiteSplit:
    data: SiteData
    train: np.ndarray  # indices
    val: np.ndarray

    @property
    def train_images(self) -> np.ndarray:
        return np.asarray(self.data.images[self.train])

    @property
    def train_labels(self) -> np.ndarray:
        return self.data.labels[self.train]

    @property
    def train_patients(self) -> np.ndarray:
        """Each training image's PatientID ("" where the file has none)."""
        return np.asarray(self.data.patient_ids, dtype=str)[self.train]

    @property
    def val_images(self) -> np.ndarray:
        return np.asarray(self.data.images[self.val])

    @property
    def val_labels(self) -> np.ndarray:
        return self.data.labels[self.val]

    @property
    def val_patients(self) -> np.ndarray:
        return np.asarray(self.data.patient_ids, dtype=str)[self.val]


def load_site_split(run: RunSettings, site: SiteSettings) -> SiteSplit:
    """The site's usable images (decoded once, then from the cache), split by patient."""
    source = SiteSource.from_path(site.data, run.class_names, site.allow_outside_paths)
    options = ReadOptions(image_size=run.image_size, max_file_bytes=site.max_file_mb * MB)
    data = load_site(source, options, site.cache_path or default_cache_dir())
    if len(data) == 0:
        raise ValueError(
            f"site {site.name}: no usable images in {site.data} for classes {run.classes} "
            "(run `fedmed data validate` on it to see why)"
        )
    train, val = data.split(run.val_fraction, run.seed)
    return SiteSplit(data, train, val)
