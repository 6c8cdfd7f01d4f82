"""DICOM decode + preprocess throughput of one site: first load versus cached load.

Builds a site of ``--files`` synthetic chest X-rays stored at ``--stored-size`` pixels in
fedmed's four DICOM styles (8-bit, MONOCHROME1 16-bit, signed 12-bit with rescale, windowed
16-bit RLE), then times ``load_site`` with an empty cache and again with the cache filled.

    python benchmarks/dicom_ingest.py --files 2000 --stored-size 512 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from fedmed.data import ReadOptions, SiteSource, load_site
from fedmed.data.export import SITE_STYLES, export_site
from fedmed.data.synthetic import synthesize, synthetic_labels


def build_site(root: Path, files: int, stored_size: int, seed: int) -> None:
    labels, patients = synthetic_labels(files, seed=seed)
    per_style = np.array_split(np.arange(files), len(SITE_STYLES))
    for style, indices in zip(SITE_STYLES, per_style):
        images = synthesize(labels[indices], tuple(patients[i] for i in indices), stored_size, seed)
        export_site(images, root / style.name, style.name, style, seed)
    # The four style folders become one folder-per-class site.
    for class_dir in root.glob("*/*"):
        target = root / "site" / class_dir.name
        target.mkdir(parents=True, exist_ok=True)
        for path in class_dir.iterdir():
            path.rename(target / f"{class_dir.parent.name}-{path.name}")


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (needs root); True when it worked."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed_load(source: SiteSource, options: ReadOptions, cache: Path) -> tuple[float, int, int]:
    start = time.perf_counter()
    site = load_site(source, options, cache)
    elapsed = time.perf_counter() - start
    return elapsed, site.report.decoded, len(site)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--stored-size", type=int, default=512, help="pixels per side in the DICOM files")
    parser.add_argument("--image-size", type=int, default=128, help="training image side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="where the site is written (default: a temp dir)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fedmed-ingest-"))
    try:
        started = time.perf_counter()
        build_site(workdir, args.files, args.stored_size, args.seed)
        print(f"built {args.files} files in {time.perf_counter() - started:.1f} s under {workdir}")
        source = SiteSource(workdir / "site")
        options = ReadOptions(image_size=args.image_size)
        cache = workdir / "cache"

        cold = drop_page_cache()
        first, decoded, used = timed_load(source, options, cache)
        drop_page_cache()
        cached, decoded_again, _ = timed_load(source, options, cache)
        result = {
            "files": args.files,
            "stored_size": args.stored_size,
            "image_size": args.image_size,
            "page_cache_dropped": cold,
            "first_load_s": round(first, 3),
            "first_load_files_per_s": round(decoded / first, 1),
            "cached_load_s": round(cached, 4),
            "cached_load_files_per_s": round(used / cached, 1),
            "decoded_on_cached_load": decoded_again,
            "speedup": round(first / cached, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        }
        print(json.dumps(result, indent=2))
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
