"""The coordinator's view of one run, read from its run directory, and its cross-check
against the sites' own ledgers where those are at hand (a simulation keeps them in
``RUN_DIR/sites/NAME/ledger.jsonl``; a hospital's officer can pass theirs)."""

from __future__ import annotations

import math
from pathlib import Path

from fedmed.config import RunSettings
from fedmed.numbers import finite_or_none, format_epsilon
from fedmed.report.findings import Finding, critical, warning
from fedmed.rundir import RunDirectory

VALIDATION = ("auroc", "accuracy", "balanced-accuracy", "loss", "examples")
EPSILON_TOLERANCE = 1e-6


def run_view(path: Path) -> tuple[dict, list[Finding]]:
    """The run directory's record, one row per round; raises FileNotFoundError if not a run."""
    run_dir = RunDirectory(path)
    run = RunSettings.from_flower(run_dir.read_config())
    status = run_dir.status()
    metrics = run_dir.metrics()
    rounds = _last_per_round([r for r in metrics if r.get("event") == "round"])
    validations = _last_per_round([r for r in metrics if r.get("event") == "validation"])
    rows = [_round_row(record, validations.get(number)) for number, record in sorted(rounds.items())]
    sites = sorted({name for row in rows for name in row["sites"]})
    initial = validations.get(0)
    view = {
        "run_dir": str(run_dir.path), "run_id": run.run_id, "phase": status.get("phase", "unknown"),
        "rounds_planned": run.rounds, "rounds_recorded": len(rows), "settings": run.user_settings(),
        "sites": sites, "rounds": rows,
        "initial_validation": _validation(initial["weighted"]) if initial else None,
    }
    findings = []
    dropped = {(row["round"], name) for row in rows for name in [*row["failed"], *row["missing"],
                                                                     *row["rejected"]]}
    if dropped:
        findings.append(warning("sites-dropped", f"{len(dropped)} site update(s) were lost: "
                                + "; ".join(f"round {r}: {n}" for r, n in sorted(dropped))))
    bounded = [f"round {row['round']}: {name}: {why}" for row in rows for name, why in row["bounded"].items()]
    if bounded:
        findings.append(warning("updates-bounded", f"{len(bounded)} update(s) bounded before aggregation: "
                                + "; ".join(bounded)))
    for row in rows:
        if (row["secure_aggregation"] or {}).get("failed"):
            findings.append(warning("secure-aggregation-failed", f"round {row['round']}: "
                                    f"{row['secure_aggregation']['failed']}"))
    for row in rows:
        if row["wasted"]:
            findings.append(warning("budget-wasted", f"round {row['round']} was discarded ({len(row['trained'])} "
                                    f"valid update(s), fewer than the minimum of {run.min_sites} sites): "
                                    f"{', '.join(row['wasted'])} paid privacy budget for it and it was not used"))
    return view, findings


def _last_per_round(records: list[dict]) -> dict[int, dict]:
    """The last record of each round (a resumed run may have repeated one)."""
    return {int(r["round"]): r for r in records if "round" in r}


def _round_row(record: dict, validation: dict | None) -> dict:
    sites = {}
    for name, metrics in record.get("sites", {}).items():
        sites[name] = {
            "status": metrics.get("status_name", ""), "dp": bool(metrics.get("dp", 0)),
            "epsilon": finite_or_none(metrics.get("epsilon")), "delta": metrics.get("delta"),
            "noise_multiplier": metrics.get("noise-multiplier"), "steps": metrics.get("steps"),
            "examples": metrics.get("examples"),
        }
    return {
        "round": int(record["round"]), "aggregated": bool(record.get("aggregated")),
        "trained": list(record.get("trained", [])), "budget_exhausted": list(record.get("budget_exhausted", [])),
        "rejected": dict(record.get("rejected", {})), "failed": dict(record.get("failed", {})),
        "missing": list(record.get("missing", [])), "examples": record.get("examples"),
        "bounded": dict(record.get("clipped", {})), "norm_bound": record.get("norm_bound"),
        "secure_aggregation": record.get("secure_aggregation"),
        # sites that trained (and paid) for a round the coordinator then discarded
        "wasted": [] if record.get("aggregated") else list(record.get("trained", [])),
        "train_loss": finite_or_none(record.get("train_loss")), "seconds": record.get("seconds"),
        "validation": _validation(validation["weighted"]) if validation else None,
        "server_validation": _server_validation(record.get("server_validation")),
        "sites": sites,
    }


def _validation(weighted: dict) -> dict:
    return {key.replace("-", "_"): finite_or_none(weighted.get(f"val-{key}")) for key in VALIDATION}


def _server_validation(scores: dict | None) -> dict | None:
    if not scores:
        return None
    return {key.replace("-", "_"): finite_or_none(scores.get(key.replace("-", "_"))) for key in VALIDATION}


def ledger_paths(path: Path) -> list[Path]:
    """The sites' ledgers kept in a run directory (simulations), if any."""
    return sorted((Path(path) / "sites").glob("*/ledger.jsonl"))


def cross_check(view: dict, accounts: list[dict]) -> list[Finding]:
    """Compare what the sites reported to the coordinator with what their ledgers hold."""
    findings = []
    by_site = {account["site"]: account for account in accounts}
    run_id = view["run_id"]
    for name in view["sites"]:
        account = by_site.get(name)
        if account is None:
            continue
        ledger_rounds = {row["round"]: row for row in account["rounds"] if row["run_id"] == run_id}
        trained = [row for row in view["rounds"] if name in row["trained"]]
        for row in trained:
            entry = ledger_rounds.get(row["round"])
            if entry is not None and name in row["wasted"]:
                entry["wasted"] = True  # the site's account shows the round as paid and wasted
            if entry is None:
                findings.append(critical("ledger-missing-round", f"the run directory says {name} trained round "
                                         f"{row['round']} of run {run_id}, but its ledger has no entry for it",
                                         name))
                continue
            reported = row["sites"].get(name, {}).get("epsilon")
            if not _same_epsilon(reported, entry["epsilon"]):
                findings.append(warning("epsilon-mismatch", f"round {row['round']}: {name} reported epsilon "
                                        f"{format_epsilon(reported, reported is not None)} to the "
                                        f"coordinator, its ledger says "
                                        f"{format_epsilon(entry['epsilon'], entry['epsilon'] is not None)}",
                                        name))
        recorded = {row["round"] for row in view["rounds"]}
        extra = sorted(r for r in ledger_rounds if r not in {row["round"] for row in trained} and r in recorded)
        if extra:
            findings.append(warning("ledger-extra-round", f"{name}'s ledger holds round(s) {extra} of run {run_id} "
                                    "that the coordinator did not aggregate from it (a reply lost or rejected "
                                    "after the site spent budget)", name))
    return findings


def _same_epsilon(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9)
