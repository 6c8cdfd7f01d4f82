"""The simulation's result tables: the federation per site and overall, and every mode side
by side on the same held-out test set."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fedmed.config import RunSettings, SiteSettings
from fedmed.files import write_atomic
from fedmed.numbers import format_epsilon, format_noisy, format_number
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.records import RoundRecord, ValidationRecord
from fedmed.report.render import markdown_table
from fedmed.rundir import RunDirectory
from fedmed.simulate.baselines import schedule_of
from fedmed.site.data import load_site_split


def federated_rows(run_dir: RunDirectory) -> tuple[dict, list[dict]]:
    """(the global model's row for the comparison, one row per site) from a finished run."""
    records = run_dir.records()
    rounds = [r for r in records if isinstance(r, RoundRecord)]
    validations = [r for r in records if isinstance(r, ValidationRecord)]
    final = validations[-1] if validations else None
    final_validation = final.sites if final is not None else {}
    final_errors = final.site_errors if final is not None else {}
    run = RunSettings.from_flower(run_dir.read_config())
    sites = [SiteSettings.from_flower(site) for site in json.loads(run.simulation_sites or "[]")]
    per_site: list[dict] = []
    epsilons: list[float] = []
    for site in sites:
        name = site.name
        ledger = PrivacyLedger(site.ledger)
        epsilon = ledger.entries[-1].epsilon if ledger.entries else 0.0
        epsilon = math.inf if epsilon is None else float(epsilon)
        epsilons.append(epsilon)
        validation = final_validation.get(name, {}) | final_errors.get(name, {})
        trained = sum(1 for r in rounds if name in r.trained)
        per_site.append(
            {
                "site": name,
                "rounds_trained": trained,
                # the simulation knows its sites' data exactly (what a site sent is noisy)
                "train_examples": len(load_site_split(run, site).train),
                "val_examples": int(validation.get("val-examples", 0)),
                "val_auroc": validation.get("val-auroc", math.nan),
                "val_auroc_se": validation.get("val-auroc-se", math.nan),
                "val_balanced_accuracy": validation.get("val-balanced-accuracy", math.nan),
                "val_balanced_accuracy_se": validation.get("val-balanced-accuracy-se", math.nan),
                "val_accuracy": validation.get("val-accuracy", math.nan),
                "epsilon": epsilon,
                "ledger": site.ledger,
                "privacy_unit": ledger.entries[-1].privacy_unit if ledger.entries else "image",
            }
        )
    test = (rounds[-1].server_validation if rounds else None) or {}
    overall = {
        "mode": "federated",
        "model": "global",
        "dp": all(s.dp for s in sites),
        "epsilon": max(epsilons, default=math.nan),
        "train_examples": sum(site["train_examples"] for site in per_site),
        "test_auroc": test.get("auroc", math.nan),
        "test_balanced_accuracy": test.get("balanced_accuracy", math.nan),
        "test_accuracy": test.get("accuracy", math.nan),
        "val_auroc": final.weighted.get("val-auroc", math.nan) if final is not None else math.nan,
        "schedule": schedule_of(run),
    }
    return overall, per_site


def sites_table(rows: list[dict]) -> str:
    header = [
        "site",
        "rounds trained",
        "train images",
        "val records (noisy)",
        "val AUROC",
        "val balanced acc",
        "val acc",
        "epsilon spent",
    ]
    return markdown_table(
        header,
        [
            [
                r["site"],
                r["rounds_trained"],
                r["train_examples"],
                r["val_examples"],
                format_noisy(r["val_auroc"], r.get("val_auroc_se")),
                format_noisy(r["val_balanced_accuracy"], r.get("val_balanced_accuracy_se")),
                format_number(r["val_accuracy"], 3),
                format_epsilon(r["epsilon"], digits=3),
            ]
            for r in rows
        ],
    )


def comparison_table(rows: list[dict]) -> str:
    header = [
        "mode",
        "model",
        "DP",
        "epsilon",
        "train images",
        "test AUROC",
        "test balanced acc",
        "test acc",
        "schedule",
    ]
    return markdown_table(
        header,
        [
            [
                r["mode"],
                r["model"],
                "yes" if r["dp"] else "NO",
                format_epsilon(r["epsilon"], r["dp"], 3),
                r["train_examples"],
                format_number(r["test_auroc"], 3),
                format_number(r["test_balanced_accuracy"], 3),
                format_number(r["test_accuracy"], 3),
                r.get("schedule", ""),
            ]
            for r in rows
        ],
    )


def write_summary(out_dir: Path, scenario: dict, comparison: list[dict], sites: list[dict], seconds: float) -> str:
    """Write summary.json and summary.md; returns the Markdown."""
    text = [
        f"# fedmed simulation: {scenario['name']}",
        "",
        f"{scenario.get('description') or ''}".strip(),
        "",
        f"Wall time {seconds:.0f} s. Test scores are on a held-out set no site trained on.",
        "",
    ]
    if any(not r["dp"] for r in comparison):
        text += ["**Rows marked DP = NO are non-private baselines: they carry no privacy guarantee.**", ""]
    text += ["## All modes on the held-out test set", "", comparison_table(comparison), ""]
    if sites:
        units = sorted({site["privacy_unit"] for site in sites})
        text += [
            "## Federated model per site (each site's own validation split)",
            "",
            sites_table(sites),
            "",
            f"Privacy unit: {', '.join(units)} (each site's epsilon bounds what its model updates and noisy "
            "counts reveal about one such record). The validation scores come from the sites' noisy counts.",
            "",
        ]
    markdown = "\n".join(text)
    write_atomic(out_dir / "summary.md", markdown.encode("utf-8"))
    payload = {"scenario": scenario, "seconds": seconds, "comparison": comparison, "federated_sites": sites}
    write_atomic(out_dir / "summary.json", (json.dumps(payload, indent=2, default=str) + "\n").encode("utf-8"))
    return markdown
