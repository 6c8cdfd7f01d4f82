"""The coordinator's view of one run, read from its run directory, and its cross-check
against the sites' own ledgers where those are at hand (a simulation keeps them in
``RUN_DIR/sites/NAME/ledger.jsonl``; a hospital's officer can pass theirs)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from fedmed.config import RunSettings
from fedmed.numbers import finite_or_none, format_epsilon
from fedmed.records import RoundRecord, ValidationRecord
from fedmed.report.findings import Finding, critical, warning
from fedmed.report.site import SiteAccount
from fedmed.rundir import RunDirectory

VALIDATION = ("auroc", "accuracy", "balanced-accuracy", "loss", "examples")
EPSILON_TOLERANCE = 1e-6


def run_view(path: Path) -> tuple[dict, list[Finding]]:
    """The run directory's record, one row per round; raises FileNotFoundError if not a run."""
    run_dir = RunDirectory(path)
    run = RunSettings.from_flower(run_dir.read_config())
    status = run_dir.status()
    records = run_dir.records()
    rounds = _last_per_round([r for r in records if isinstance(r, RoundRecord)])
    validations = _last_per_round([r for r in records if isinstance(r, ValidationRecord)])
    rows = [_round_row(record, validations.get(number)) for number, record in sorted(rounds.items())]
    sites = sorted({name for row in rows for name in row["sites"]})
    initial = validations.get(0)
    view = {
        "run_dir": str(run_dir.path),
        "run_id": run.run_id,
        "phase": status.get("phase", "unknown"),
        "rounds_planned": run.rounds,
        "rounds_recorded": len(rows),
        "settings": run.user_settings(),
        "sites": sites,
        "rounds": rows,
        "initial_validation": _validation(initial.weighted) if initial is not None else None,
    }
    findings = []
    dropped = {(row["round"], name) for row in rows for name in [*row["failed"], *row["missing"], *row["rejected"]]}
    if dropped:
        findings.append(
            warning(
                "sites-dropped",
                f"{len(dropped)} site update(s) were lost: " + "; ".join(f"round {r}: {n}" for r, n in sorted(dropped)),
            )
        )
    bounded = [f"round {row['round']}: {name}: {why}" for row in rows for name, why in row["bounded"].items()]
    if bounded:
        findings.append(
            warning("updates-bounded", f"{len(bounded)} update(s) bounded before aggregation: " + "; ".join(bounded))
        )
    for row in rows:
        if (row["secure_aggregation"] or {}).get("failed"):
            findings.append(
                warning("secure-aggregation-failed", f"round {row['round']}: {row['secure_aggregation']['failed']}")
            )
    for row in rows:
        if row["wasted"]:
            findings.append(
                warning(
                    "budget-wasted",
                    f"round {row['round']} was discarded ({len(row['trained'])} "
                    f"valid update(s), fewer than the minimum of {run.min_sites} sites): "
                    f"{', '.join(row['wasted'])} paid privacy budget for it and it was not used",
                )
            )
    return view, findings


R = TypeVar("R", RoundRecord, ValidationRecord)


def _last_per_round(records: list[R]) -> dict[int, R]:
    """The last record of each round (a resumed run may have repeated one)."""
    return {int(r.round): r for r in records}


def _round_row(record: RoundRecord, validation: ValidationRecord | None) -> dict:
    sites = {}
    for name, metrics in record.sites.items():
        sites[name] = {
            "status": metrics.get("status_name", ""),
            "dp": bool(metrics.get("dp", 0)),
            "epsilon": finite_or_none(metrics.get("epsilon")),
            "delta": metrics.get("delta"),
            "noise_multiplier": metrics.get("noise-multiplier"),
            "steps": metrics.get("steps"),
            "examples": metrics.get("examples"),
        }
    return {
        "round": int(record.round),
        "aggregated": bool(record.aggregated),
        "trained": list(record.trained),
        "budget_exhausted": list(record.budget_exhausted),
        "rejected": dict(record.rejected),
        "failed": dict(record.failed),
        "missing": list(record.missing),
        "examples": record.examples,
        "bounded": dict(record.clipped),
        "norm_bound": record.norm_bound,
        "secure_aggregation": record.secure_aggregation,
        # sites that trained (and paid) for a round the coordinator then discarded
        "wasted": [] if record.aggregated else list(record.trained),
        "train_loss": finite_or_none(record.train_loss),
        "seconds": record.seconds,
        "validation": _validation(validation.weighted) if validation is not None else None,
        "server_validation": _server_validation(record.server_validation),
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


def cross_check(view: dict, accounts: list[SiteAccount]) -> list[Finding]:
    """Compare what the sites reported to the coordinator with what their ledgers hold."""
    findings = []
    by_site = {account.site: account for account in accounts}
    run_id = view["run_id"]
    for name in view["sites"]:
        account = by_site.get(name)
        if account is None:
            continue
        ledger_rounds = {row["round"]: row for row in account.rounds if row["run_id"] == run_id}
        trained = [row for row in view["rounds"] if name in row["trained"]]
        for row in trained:
            entry = ledger_rounds.get(row["round"])
            if entry is None:
                findings.append(
                    critical(
                        "ledger-missing-round",
                        f"the run directory says {name} trained round "
                        f"{row['round']} of run {run_id}, but its ledger has no entry for it",
                        name,
                    )
                )
                continue
            reported = row["sites"].get(name, {}).get("epsilon")
            if not _same_epsilon(reported, entry["epsilon"]):
                findings.append(
                    warning(
                        "epsilon-mismatch",
                        f"round {row['round']}: {name} reported epsilon "
                        f"{format_epsilon(reported, reported is not None)} to the "
                        f"coordinator, its ledger says "
                        f"{format_epsilon(entry['epsilon'], entry['epsilon'] is not None)}",
                        name,
                    )
                )
        recorded = {row["round"] for row in view["rounds"]}
        extra = sorted(r for r in ledger_rounds if r not in {row["round"] for row in trained} and r in recorded)
        if extra:
            findings.append(
                warning(
                    "ledger-extra-round",
                    f"{name}'s ledger holds round(s) {extra} of run {run_id} "
                    "that the coordinator did not aggregate from it (a reply lost or rejected "
                    "after the site spent budget)",
                    name,
                )
            )
    return findings


def mark_wasted(view: dict, account: SiteAccount) -> SiteAccount:
    """``account`` with each round of the view's run that the site paid for and the
    coordinator then discarded marked as wasted (the ledger's last entry of that round)."""
    if account.site not in view["sites"]:
        return account
    last = {row["round"]: index for index, row in enumerate(account.rounds) if row["run_id"] == view["run_id"]}
    wasted = {last[row["round"]] for row in view["rounds"] if account.site in row["wasted"] and row["round"] in last}
    if not wasted:
        return account
    return replace(
        account, rounds=[row | {"wasted": True} if index in wasted else row for index, row in enumerate(account.rounds)]
    )


def _same_epsilon(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=EPSILON_TOLERANCE, abs_tol=1e-9)
