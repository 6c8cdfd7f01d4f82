"""The virtual hospitals' data for a simulation: per-site DICOM folders plus a held-out
test set, written once and reused while the scenario's data settings stay the same.

Sites then read their folders through the same DICOM reader and cache a real hospital
uses, so a simulation exercises the deployment's data path.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmed.data.export import SITE_STYLES, export_site
from fedmed.data.make_sites import export_sites, site_names, synthetic_sites
from fedmed.data.npz import load_npz, save_npz
from fedmed.data.partition import class_table, dirichlet_partition
from fedmed.data.split import split_by_patient
from fedmed.data.synthetic import synthetic_public_pool
from fedmed.simulate.scenario import Scenario

DATA_KEYS = (
    "source",
    "path",
    "site_dirs",
    "test_dir",
    "images",
    "test_fraction",
    "sites",
    "alpha",
    "quantity_alpha",
    "seed",
    "min_site_size",
)  # the simulation settings that decide the sites' files
FINGERPRINT = "fingerprint.json"
SYNTHETIC_SIZE = 64  # synthetic images are drawn at this side; sites resize to the run's size


PUBLIC_POOL_IMAGES = 1000  # the synthetic public pool, when a scenario pre-trains on it


@dataclass(frozen=True)
class SimulationData:
    names: tuple[str, ...]
    site_dirs: tuple[Path, ...]
    test_dir: Path
    table: str  # per-site class counts, for people


def write_public_pool(folder: Path, seed: int) -> Path:
    """Write (once) the synthetic generator's public pool as a MedMNIST-style .npz; it
    holds none of the sites' images, patients or scanners (``synthetic_public_pool``)."""
    path = folder / f"public-pool-{seed}.npz"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        save_npz(path, {"train": synthetic_public_pool(PUBLIC_POOL_IMAGES, SYNTHETIC_SIZE, seed)})
    return path


def prepare_sites(scenario: Scenario, data_dir: Path) -> SimulationData:
    """Write (or reuse) the scenario's per-site DICOM folders and test folder under ``data_dir``."""
    settings = scenario.simulation
    if settings.source == "dicom":
        dirs = tuple(Path(d).resolve() for d in settings.site_dirs)
        missing = [str(d) for d in (*dirs, Path(settings.test_dir)) if not d.exists()]
        if missing:
            raise FileNotFoundError(f"scenario data not found: {', '.join(missing)}")
        return SimulationData(
            tuple(d.name for d in dirs),
            dirs,
            Path(settings.test_dir).resolve(),
            "(existing DICOM folders; run `fedmed data validate` on each for counts)",
        )
    fingerprint = {key: getattr(settings, key) for key in DATA_KEYS} | {"classes": scenario.run.classes}
    if settings.source == "npz":
        fingerprint["npz_sha256"] = _sha256(Path(settings.path))
    names = tuple(site_names(settings.sites))
    stamp = data_dir / FINGERPRINT
    if stamp.is_file() and json.loads(stamp.read_text())["settings"] == json.loads(json.dumps(fingerprint)):
        saved = json.loads(stamp.read_text())
        return SimulationData(names, tuple(data_dir / "sites" / n for n in names), data_dir / "test", saved["table"])
    if stamp.is_file():
        shutil.rmtree(data_dir)  # written by fedmed for earlier settings of this scenario
    elif data_dir.exists() and any(data_dir.iterdir()):
        raise FileExistsError(f"{data_dir} holds files fedmed did not write; choose another --out")
    data_dir.mkdir(parents=True, exist_ok=True)
    images, parts, test = _partition(scenario)
    table = class_table(parts, images.labels, images.classes, list(names))
    export_sites(images, parts, data_dir / "sites", settings.seed)
    export_site(test, data_dir / "test", "test-set", SITE_STYLES[0], settings.seed)
    stamp.write_text(json.dumps({"settings": fingerprint, "table": table}, indent=2) + "\n")
    return SimulationData(names, tuple(data_dir / "sites" / n for n in names), data_dir / "test", table)


def _partition(scenario: Scenario):
    """(training pool, one index array per site, test set) for the scenario."""
    classes, settings = scenario.run.class_names, scenario.simulation
    if settings.source == "npz":
        pool = load_npz(settings.path, "train", classes)
        parts = dirichlet_partition(
            pool.labels,
            settings.sites,
            alpha=settings.alpha,
            quantity_alpha=settings.quantity_alpha,
            seed=settings.seed,
            min_site_size=settings.min_site_size,
        )
        return pool, parts, load_npz(settings.path, "test", classes)
    # synthetic: hold out a share of every site's patients, so the test set has every scanner
    pool, parts = synthetic_sites(
        settings.images,
        settings.sites,
        alpha=settings.alpha,
        quantity_alpha=settings.quantity_alpha,
        size=SYNTHETIC_SIZE,
        seed=settings.seed,
        min_site_size=settings.min_site_size,
    )
    kept, held_out = [], []
    for part in parts:
        rest, test = split_by_patient(
            pool.labels[part], [pool.patient_ids[i] for i in part], settings.test_fraction, settings.seed
        )
        kept.append(part[rest])
        held_out.append(part[test])
    return pool, kept, pool.subset(np.concatenate(held_out))


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"scenario data.path {path} not found")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
