"""``fedmed data ...``: check a site's DICOM folder and build simulated hospital sites."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from fedmed.config import SiteSettings
from fedmed.config.command_line import add_options, given
from fedmed.data.cache import default_cache_dir, purge_cache
from fedmed.data.dicom import MB, MULTIFRAME_POLICIES, ReadOptions
from fedmed.data.export import SITE_STYLES, export_site
from fedmed.data.make_sites import export_sites, site_names, synthetic_sites
from fedmed.data.npz import SPLITS, load_npz, save_npz
from fedmed.data.partition import class_table, dirichlet_partition
from fedmed.data.report import printable
from fedmed.data.site import SiteSource, load_site, site_cache_key
from fedmed.data.split import split_by_patient
from fedmed.data.synthetic import synthesize, synthetic_labels


def register(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="check site data and build simulated sites")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_validate(sub)
    _add_make_sites(sub)
    _add_synth(sub)
    _add_purge_cache(sub)


def _classes(text: str | None) -> tuple[str, ...] | None:
    return tuple(c.strip() for c in text.split(",") if c.strip()) if text else None


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "iid", "equal") else float(text)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "validate",
        help="read a site's DICOM files and report every file used or skipped",
        description=(
            "Read every file of a hospital site and print how many usable images each class "
            "has and why each skipped file was skipped. DATA is a folder with one sub-folder "
            "per class (DATA/<label>/**/file) or a CSV manifest with the header "
            "path,label[,patient_id]. Source files are only read. Exit status: 0 when at "
            "least one usable image was found, 1 when none was."
        ),
    )
    p.add_argument("data", type=Path, metavar="DATA", help="site folder or CSV manifest")
    p.add_argument(
        "--classes", help="comma-separated class names; other labels are skipped (default: the labels found)"
    )
    p.add_argument("--image-size", type=int, default=64, help="side of the square training image (default 64)")
    p.add_argument(
        "--multiframe",
        choices=MULTIFRAME_POLICIES,
        default="reject",
        help="multi-frame files: reject them, or use their middle frame (default reject)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where decoded images are cached (default $FEDMED_CACHE_DIR or ~/.cache/fedmed)",
    )
    p.add_argument("--no-cache", action="store_true", help="decode everything, write no cache")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_options(
        p, SiteSettings, "which files are read, as at the site (fedmed-client's [site] settings)", only=SITE_FILE_CHECKS
    )
    p.set_defaults(handler=_validate)


SITE_FILE_CHECKS = ("max_file_mb", "allow_outside_paths")  # validate checks files as the site does


def _validate(args: argparse.Namespace) -> int:
    site_settings = SiteSettings(**given(args, SiteSettings))  # the declared defaults and ranges
    source = SiteSource.from_path(args.data, _classes(args.classes), site_settings.allow_outside_paths)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    options = ReadOptions(args.image_size, args.multiframe, site_settings.max_file_mb * MB)
    site = load_site(source, options, cache_dir)
    print(site.report.to_json() if args.json else site.report.to_text())
    if len(site) == 0:
        print(f"error: no usable image in {printable(str(args.data))}", file=sys.stderr)
        return 1
    return 0


def _add_make_sites(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "make-sites",
        help="split a dataset into unbalanced hospital sites and write them as DICOM folders",
        description=(
            "Partition a dataset over N simulated hospitals (Dirichlet label skew and quantity "
            "skew, seeded) and write OUT/site-<i>/<class>/*.dcm, each site with its own DICOM "
            "conventions (8-bit; MONOCHROME1 16-bit; signed 12-bit with rescale; windowed 16-bit "
            "RLE). Prints the per-site class table and writes it to OUT/sites.json."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", action="store_true", help="use built-in synthetic chest X-rays")
    source.add_argument("--npz", type=Path, help="a MedMNIST-style .npz file")
    p.add_argument("--out", type=Path, required=True, help="new or empty output folder")
    p.add_argument("--sites", type=int, default=4, help="number of hospitals (default 4)")
    p.add_argument(
        "--alpha",
        type=_optional_float,
        default=0.5,
        help="Dirichlet label-skew concentration; smaller is more skewed, 'none' for equal class mixes (default 0.5)",
    )
    p.add_argument(
        "--quantity-alpha",
        type=_optional_float,
        default=2.0,
        help="Dirichlet concentration of site sizes; smaller is more unequal, 'none' "
        "for equal expected sizes (default 2.0)",
    )
    p.add_argument("--min-site-size", type=int, default=10, help="fewest images (synthetic: patients) a site may get")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", choices=SPLITS, default="train", help="which split of the .npz to use")
    p.add_argument("--classes", help="comma-separated class names for the .npz labels 0, 1, ...")
    p.add_argument("--images", type=int, default=1000, help="synthetic pool size (default 1000)")
    p.add_argument("--image-size", type=int, default=64, help="synthetic image side (default 64)")
    p.set_defaults(handler=_make_sites)


def _make_sites(args: argparse.Namespace) -> int:
    if args.synthetic:
        images, sites = synthetic_sites(
            args.images,
            args.sites,
            alpha=args.alpha,
            quantity_alpha=args.quantity_alpha,
            size=args.image_size,
            seed=args.seed,
            min_site_size=args.min_site_size,
        )
    else:
        images = load_npz(args.npz, args.split, _classes(args.classes))
        sites = dirichlet_partition(
            images.labels,
            args.sites,
            alpha=args.alpha,
            quantity_alpha=args.quantity_alpha,
            seed=args.seed,
            min_site_size=args.min_site_size,
        )
    print(class_table(sites, images.labels, images.classes, site_names(len(sites))))
    summary = export_sites(images, sites, args.out, args.seed)
    for site in summary["sites"]:
        print(f"wrote {args.out / site['name']}  ({site['images']} images, DICOM style {site['dicom_style']})")
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="generate synthetic chest X-rays as a DICOM site folder or a .npz file",
        description=(
            "Generate synthetic chest-X-ray-like images (classes normal and pneumonia). OUT "
            "ending in .npz gives a MedMNIST-style file with train/val/test splits (by "
            "patient); any other OUT gives one hospital's DICOM folder OUT/<class>/*.dcm."
        ),
    )
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--images", type=int, default=500, help="number of images (default 500)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--pneumonia-fraction", type=float, default=0.6, help="share of pneumonia images (default 0.6)")
    p.add_argument("--scanner", type=int, default=0, help="scanner profile of the site, 0-3 (default 0)")
    p.add_argument(
        "--style",
        choices=[s.name for s in SITE_STYLES],
        default=SITE_STYLES[0].name,
        help="DICOM conventions of the folder (default plain-8bit)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_synth)


def _synth(args: argparse.Namespace) -> int:
    labels, patients = synthetic_labels(args.images, args.pneumonia_fraction, args.seed)
    site_of = np.full(len(labels), args.scanner, dtype=np.int64)
    images = synthesize(labels, patients, args.image_size, args.seed, site_of=site_of)
    if args.out.suffix.lower() == ".npz":
        rest, test = split_by_patient(images.labels, list(images.patient_ids), 0.2, args.seed)
        train, val = split_by_patient(images.labels[rest], [images.patient_ids[i] for i in rest], 0.125, args.seed)
        splits = {"train": images.subset(rest[train]), "val": images.subset(rest[val]), "test": images.subset(test)}
        save_npz(args.out, splits)
        sizes = ", ".join(f"{name} {len(part)}" for name, part in splits.items())
        print(f"wrote {args.out} ({sizes}; classes {', '.join(images.classes)})")
        return 0
    style = next(s for s in SITE_STYLES if s.name == args.style)
    export_site(images, args.out, args.out.name, style, args.seed)
    counts = json.dumps(dict(zip(images.classes, np.bincount(images.labels, minlength=2).tolist())))
    print(f"wrote {len(images)} DICOM files to {args.out} ({counts})")
    return 0


def _add_purge_cache(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "purge-cache",
        help="delete the decoded images fedmed keeps for faster loading",
        description=(
            "Delete fedmed's preprocessing cache: decoded, resized copies of a site's images, derived "
            "from patients' studies and kept (owner-only) so later runs load faster. Only folders laid "
            "out as fedmed's cache are removed; the source DICOM files are never touched. The next run "
            "decodes the images again."
        ),
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="the cache to purge (default $FEDMED_CACHE_DIR or ~/.cache/fedmed)"
    )
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="purge only this site folder's or manifest's cache (default: every site's)",
    )
    p.set_defaults(handler=_purge_cache)


def _purge_cache(args: argparse.Namespace) -> int:
    cache_dir = args.cache_dir or default_cache_dir()
    if not cache_dir.is_dir():
        print(f"no cache at {printable(str(cache_dir))}: nothing to purge")
        return 0
    site = site_cache_key(SiteSource.from_path(args.data)) if args.data else None
    removed = purge_cache(cache_dir, site)
    for folder in removed:
        print(f"removed {printable(str(folder))}")
    print(f"{len(removed)} cached site folder(s) removed from {printable(str(cache_dir))}")
    return 0
