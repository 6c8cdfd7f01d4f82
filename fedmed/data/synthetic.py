"""Synthetic chest-X-ray-like images, so fedmed can be tried with no data download.

Each image shows a bright thorax with two dark lung fields, a mediastinum and spine,
a heart shadow and faint ribs, all varying a little from patient to patient. Pneumonia
images add one to three patchy opacities inside the lungs; normal images sometimes carry
a tiny faint spot, so the task is learnable but not trivial. Each hospital has its own
scanner profile (brightness, contrast, gamma, noise), as real sites do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmed.data.imageset import ImageSet

CLASSES = ("normal", "pneumonia")


@dataclass(frozen=True)
class ScannerProfile:
    """How one hospital's acquisitions differ from another's."""

    brightness: float = 0.0
    contrast: float = 1.0
    gamma: float = 1.0
    noise: float = 0.03


SCANNER_PROFILES = (
    ScannerProfile(),
    ScannerProfile(brightness=0.06, contrast=0.85, gamma=1.2, noise=0.04),
    ScannerProfile(brightness=-0.05, contrast=1.15, gamma=0.85, noise=0.02),
    ScannerProfile(brightness=0.02, contrast=0.95, gamma=1.05, noise=0.06),
)


# A public archive's scanners: none of them is a site's, so a model pre-trained on the
# public pool meets every site's acquisition as new.
PUBLIC_PROFILES = (
    ScannerProfile(brightness=0.03, contrast=1.05, gamma=0.95, noise=0.035),
    ScannerProfile(brightness=-0.03, contrast=0.9, gamma=1.1, noise=0.05),
)
PUBLIC_SEED_OFFSET = 1_000_003  # the public pool's random stream never meets a site's
# Public archives' labels are mined from reports, not read by a radiologist for the task:
# this share of the public pool's labels is wrong (flipped, per patient).
PUBLIC_LABEL_NOISE = 0.3


def synthetic_public_pool(
    n_images: int, size: int = 64, seed: int = 0, label_noise: float = PUBLIC_LABEL_NOISE
) -> ImageSet:
    """A public pool of synthetic chest X-rays: balanced classes, its own patients
    ("PUB..."), scanners and random stream, so it shares no image with any site, and
    labels of a public archive's quality (``label_noise`` of the patients mislabelled)."""
    labels, patients = synthetic_labels(n_images, 0.5, seed + PUBLIC_SEED_OFFSET)
    patients = tuple(p.replace("SYN", "PUB", 1) for p in patients)
    site_of = np.arange(len(labels)) % len(PUBLIC_PROFILES)
    pool = synthesize(labels, patients, size, seed + PUBLIC_SEED_OFFSET, site_of=site_of, profiles=PUBLIC_PROFILES)
    rng = np.random.default_rng(seed + PUBLIC_SEED_OFFSET)
    wrong = {p for p in dict.fromkeys(patients) if rng.random() < label_noise}
    flipped = np.array([1 - label if p in wrong else label for label, p in zip(labels, patients)], dtype=np.int64)
    return ImageSet(pool.images, flipped, pool.classes, pool.patient_ids)


def synthetic_labels(
    n_images: int, pneumonia_fraction: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels and patient ids for ``n_images``; a patient has 1 to 3 images, one label."""
    if not 0.0 < pneumonia_fraction < 1.0:
        raise ValueError(f"pneumonia_fraction must lie strictly between 0 and 1, got {pneumonia_fraction}")
    rng = np.random.default_rng(seed)
    labels: list[int] = []
    patients: list[str] = []
    patient = 0
    while len(labels) < n_images:
        label = int(rng.random() < pneumonia_fraction)
        count = min(int(rng.integers(1, 4)), n_images - len(labels))
        labels += [label] * count
        patients += [f"SYN{seed:04d}-{patient:06d}"] * count
        patient += 1
    return np.asarray(labels, dtype=np.int64), tuple(patients)


def synthesize(
    labels: np.ndarray,
    patient_ids: tuple[str, ...],
    size: int = 64,
    seed: int = 0,
    *,
    site_of: np.ndarray | None = None,
    profiles: tuple[ScannerProfile, ...] = SCANNER_PROFILES,
) -> ImageSet:
    """Draw one image per label; ``site_of[i]`` picks image i's scanner profile among ``profiles``."""
    rng = np.random.default_rng(seed)
    site_of = np.zeros(len(labels), dtype=np.int64) if site_of is None else np.asarray(site_of)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    images = np.empty((len(labels), size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        profile = profiles[int(site_of[i]) % len(profiles)]
        anatomy, lungs = _chest(x, y, rng)
        if label == 1:
            anatomy += _opacities(x, y, lungs, rng, count=int(rng.integers(1, 4)), strength=(0.25, 0.45))
        elif rng.random() < 0.3:
            anatomy += _opacities(x, y, lungs, rng, count=1, strength=(0.04, 0.1), sigma=(0.03, 0.06))
        images[i] = _acquire(anatomy, profile, rng)
    return ImageSet(
        images=images, labels=np.asarray(labels, dtype=np.int64), classes=CLASSES, patient_ids=tuple(patient_ids)
    )


def _ellipse(
    x: np.ndarray, y: np.ndarray, *, cx: float, cy: float, rx: float, ry: float, edge: float = 0.08
) -> np.ndarray:
    """A soft-edged ellipse mask in [0, 1]."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return np.clip((1.0 - r) / edge + 0.5, 0.0, 1.0)


def _chest(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Normal anatomy with patient-to-patient variation; returns (image, lung mask)."""
    shift_x, shift_y = rng.normal(0, 0.04, size=2)
    scale = rng.uniform(0.9, 1.08)
    xs, ys = (x - shift_x) / scale, (y - shift_y) / scale
    thorax = _ellipse(xs, ys, cx=0.0, cy=0.1, rx=0.85, ry=1.0, edge=0.15)
    lungs = np.maximum(
        _ellipse(xs, ys, cx=-0.4, cy=-0.05, rx=0.27, ry=0.58), _ellipse(xs, ys, cx=0.4, cy=-0.05, rx=0.27, ry=0.58)
    )
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (ys * 4.5 + 0.9 * xs**2 + rng.uniform(0, 1)))
    spine = np.exp(-((xs / 0.1) ** 2)) * thorax
    heart = _ellipse(xs, ys, cx=0.12, cy=0.35, rx=0.3, ry=0.25, edge=0.3)
    image = 0.08 + 0.5 * thorax - 0.32 * lungs + 0.07 * ribs * lungs + 0.25 * spine + 0.12 * heart
    return image, lungs


def _opacities(
    x: np.ndarray,
    y: np.ndarray,
    lungs: np.ndarray,
    rng: np.random.Generator,
    *,
    count: int,
    strength: tuple[float, float],
    sigma: tuple[float, float] = (0.08, 0.18),
) -> np.ndarray:
    """Patchy bright blobs, kept inside the lung fields."""
    total = np.zeros_like(x)
    for _ in range(count):
        cx = rng.choice([-0.4, 0.4]) + rng.uniform(-0.12, 0.12)
        cy = rng.uniform(-0.45, 0.35)
        s = rng.uniform(*sigma)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2)))
        texture = 0.7 + 0.3 * rng.random(x.shape)
        total += rng.uniform(*strength) * blob * texture
    return total * lungs


def _acquire(anatomy: np.ndarray, profile: ScannerProfile, rng: np.random.Generator) -> np.ndarray:
    """The site's scanner: contrast, brightness, gamma and noise, then 8-bit quantisation."""
    image = np.clip(anatomy, 0.0, 1.0) ** profile.gamma
    image = (image - 0.5) * profile.contrast + 0.5 + profile.brightness
    image = image + rng.normal(0.0, profile.noise, size=image.shape)
    return np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
