"""A site's privacy account, read from its ledger (the authoritative record).

The ledger's hash chain is verified: a broken link means a line was edited, inserted or
removed, and the report says where (it is still produced, since that is when the privacy
officer needs it). A line that cannot be read, the last one included (a torn write), is
critical and counts as spent: what it spent is unknown, so the site's budget is counted as
fully spent (nothing left, epsilon at least the budget) until the ledger is restored, as
the site itself refuses to train on it. Every entry is re-checked: its epsilon is recomputed from its accountant
state, the state must follow from the previous one and the round's (or release's)
parameters, and the same history is given to an independent accountant (RDP) for a second
opinion. An adaptively clipped round's two noises must make the joint noise multiplier its
accountant composed, and its clip norms must stay under the run's ceiling.
Each line's epsilon is rechecked with the accountant it names: lines written with
PLD by the rule ``PrivacyLedger.epsilon`` keeps (never below an epsilon recorded before),
older lines with RDP as it was. Each run lists what left the site: its model updates and every other release,
private or not.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from fedmed.audit import SITE_AUDIT_FILE
from fedmed.privacy.accounting import ACCOUNTANT, accountant_epsilon, epsilon, extend
from fedmed.privacy.adaptive_clipping import joint_noise
from fedmed.privacy.ledger import (
    ChainCheck,
    LedgerEntry,
    LedgerRefusal,
    LedgerRelease,
    line_count,
    parse_ledger,
    verify_chain,
)
from fedmed.privacy.second_opinion import SECOND_OPINION, second_opinion_epsilon
from fedmed.report.findings import NEARLY_SPENT, Finding, critical, warning

RELATIVE_TOLERANCE = 1e-6
JOINT_NOISE_TOLERANCE = 1e-9  # z_eff from its two parts: floating-point rounding only


@dataclass(frozen=True)
class SiteAccount:
    """A site's privacy account, as the report's ``sites`` holds it (docs/privacy-report.md).
    The rows (runs, rounds, releases, refused rounds) stay the report's plain rows."""

    site: str
    ledger: str  # its path
    ledger_lines: int = 0
    ledger_chain: dict[str, Any] | None = None  # status, chained_lines, unchained_lines, first_bad_line
    accountant: str = ACCOUNTANT
    second_opinion_accountant: str = SECOND_OPINION
    delta: float | None = None
    budget: float | None = None  # the site's hard epsilon budget; None: none known
    target_epsilon: float | None = None
    epsilon_spent: float | None = 0.0  # None: unbounded (a non-private round, or an unreadable line and no budget)
    epsilon_second_opinion: float | None = 0.0
    non_private_rounds: int = 0
    budget_left: float | None = None
    budget_used: float | None = None  # the share spent
    runs: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)
    releases: list[dict] = field(default_factory=list)
    refused: list[dict] = field(default_factory=list)
    unreadable_lines: list[int] = field(default_factory=list)
    audit: dict[str, Any] | None = None  # the empirical audit beside the ledger (fedmed audit), if one ran

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["audit"] is None:  # no audit: the account reads as before audits existed
            del data["audit"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SiteAccount:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def site_account(ledger_path: Path, budget: float | None = None) -> tuple[dict, list[Finding]]:
    """``ledger_account`` as the report's JSON holds it."""
    account, findings = ledger_account(ledger_path, budget)
    return account.to_json(), findings


def ledger_account(ledger_path: Path, budget: float | None = None) -> tuple[SiteAccount, list[Finding]]:
    """The account of the site whose ledger is ``ledger_path``, and what is wrong with it.

    ``budget`` overrides the budget recorded in the ledger (older ledgers lack it).
    """
    ledger_path = Path(ledger_path)
    try:
        text = ledger_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        name = ledger_path.parent.name or str(ledger_path)
        finding = critical("ledger-missing", f"cannot read the ledger {ledger_path}: {exc}", name)
        return SiteAccount(name, str(ledger_path)), [finding]
    records, problems = parse_ledger(text)
    entries = [r for r in records if isinstance(r, LedgerEntry)]
    refusals = [r for r in records if isinstance(r, LedgerRefusal)]
    site = entries[0].site if entries else (refusals[0].site if refusals else ledger_path.parent.name)
    lines = line_count(text)
    findings = _line_findings(ledger_path, problems, lines, site)
    links = verify_chain(text)
    findings += _chain_findings(ledger_path, links, site)

    chain = [r for r in records if isinstance(r, (LedgerEntry, LedgerRelease))]
    rounds, releases, checks = _history(chain, site)
    findings += checks + _release_findings(releases, site)
    account = SiteAccount(
        site,
        str(ledger_path),
        ledger_lines=lines,
        ledger_chain={
            "status": links.status,
            "chained_lines": links.chained,
            "unchained_lines": links.unchained,
            "first_bad_line": links.first_bad_line,
        },
        rounds=rounds,
        releases=releases,
        runs=_runs(rounds, releases),
        refused=[_refusal_row(r) for r in refusals],
    )
    if entries:
        last = entries[-1]
        non_private = sum(not e.dp for e in entries)
        # the last round or private release: what the site has spent (an exact release spends nothing)
        latest = max(
            (r for r in [*rounds, *releases] if r["epsilon"] is not None and r.get("private", True)),
            key=lambda r: r["line"],
            default=rounds[-1],
        )
        second = (
            latest["epsilon_second_opinion"]
            if "statistic" not in latest
            else _second_opinion(
                chain[latest["line"]].accountant_state, latest["delta"], "the latest release", site, findings
            )
        )
        account = replace(
            account,
            accountant=latest["accountant"],
            budget=budget if budget is not None else last.max_epsilon,
            target_epsilon=last.target_epsilon,
            delta=last.delta,
            non_private_rounds=non_private,
            # unbounded (null) once any round was non-private
            epsilon_spent=None if non_private else latest["epsilon"],
            epsilon_second_opinion=None if non_private else second,
        )
    elif budget is not None:
        account = replace(account, budget=budget)
    # with an unreadable line the whole budget counts as spent (the critical line finding says so);
    # a budget the readable lines alone exceed is still reported
    findings += [f for f in _budget_findings(account) if not problems or f.code == "budget-exceeded"]
    if problems:
        account = _count_as_spent(account, [number for number, _ in problems])
    if refusals:
        findings.append(
            warning(
                "rounds-refused",
                f"{len(refusals)} round(s) refused because the budget would "
                f"have been exceeded (last: run {refusals[-1].run_id}, round {refusals[-1].round})",
                site,
            )
        )
    audit, audit_findings = _site_audit(ledger_path, account)
    budget_left, budget_used = _budget_left(account)
    return replace(account, budget_left=budget_left, budget_used=budget_used, audit=audit), findings + audit_findings


def _site_audit(ledger_path: Path, account: SiteAccount) -> tuple[dict | None, list[Finding]]:
    """The audit ``fedmed audit`` wrote beside the ledger, read as untrusted input, and a
    critical finding when its lower bound on epsilon is above what the ledger records (the
    bound concerns one run, and the ledger's epsilon composes every run, so it may only be
    larger)."""
    path = ledger_path.parent / SITE_AUDIT_FILE
    if not path.is_file():
        return None, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        membership = [
            {
                "attack": str(a["attack"]),
                "auc": float(a["auc"]),
                "interval": [float(a["interval"][0]), float(a["interval"][1])],
                "members": int(a["members"]),
                "non_members": int(a["non_members"]),
            }
            for a in data.get("membership", [])
        ]
        found = data.get("canary_audit")
        canary = (
            None
            if found is None
            else {
                **{k: float(found[k]) for k in ("epsilon_lower_bound", "confidence", "delta")},
                **{k: int(found[k]) for k in ("canaries", "guesses", "correct")},
            }
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        return None, [warning("audit-unreadable", f"cannot read the audit {path}: {exc}", account.site)]
    audit = {"file": str(path), "run_id": str(data.get("run_id", "")), "membership": membership, "canary_audit": canary}
    spent = account.epsilon_spent
    if canary is not None and spent is not None and canary["epsilon_lower_bound"] > spent:
        return audit, [
            critical(
                "audit-above-ledger",
                f"the canary audit of run {audit['run_id']} proves epsilon >= {canary['epsilon_lower_bound']:.3f} "
                f"at {canary['confidence']:.0%} confidence, above the {spent:.3f} this ledger records: the model "
                "reveals more about a record than the ledger allows (noise missing or too small?)",
                account.site,
            )
        ]
    return audit, []


def _line_findings(path: Path, problems: list[tuple[int, str]], lines: int, site: str) -> list[Finding]:
    """Every unreadable line is critical: the site cannot prove what it spent, and refuses to train."""
    findings = []
    for number, problem in problems:
        if number == lines:
            findings.append(
                critical(
                    "ledger-torn-line",
                    f"{path}: line {number} (the last) is incomplete or cannot "
                    f"be read; a write was cut short ({problem}). What it spent is unknown, so the "
                    "whole budget counts as spent and the site refuses to train. Restore the "
                    "ledger from a backup.",
                    site,
                )
            )
        else:
            findings.append(
                critical(
                    "ledger-damaged",
                    f"{path}: line {number} of {lines} cannot be read "
                    f"({problem}); the ledger cannot prove what the site spent, so the whole "
                    "budget counts as spent and the site refuses to train. Restore it from a "
                    "backup.",
                    site,
                )
            )
    return findings


def _chain_findings(path: Path, links: ChainCheck, site: str) -> list[Finding]:
    """A broken hash chain is critical; lines written before the chain existed are a warning,
    since nothing shows an edit to them."""
    if not links.intact:
        return [
            critical(
                "ledger-chain-broken",
                f"{path}: {links.problem}. The ledger cannot prove what the site spent. Restore it from a backup.",
                site,
            )
        ]
    if links.status == "unchained":
        return [
            warning(
                "ledger-unchained",
                f"{path}: none of its {links.unchained} line(s) carries a hash link "
                "(written by a fedmed older than the chain), so an edited, inserted or removed line cannot "
                "be detected; the site's next write starts the chain",
                site,
            )
        ]
    if links.status == "partly-chained":
        return [
            warning(
                "ledger-unchained",
                f"{path}: its first {links.unchained} line(s) were written by a fedmed "
                "older than the hash chain, so an edit among them cannot always be detected; the "
                f"{links.chained} line(s) after them are chained",
                site,
            )
        ]
    return []


def _history(records: list[LedgerEntry | LedgerRelease], site: str) -> tuple[list[dict], list[dict], list[Finding]]:
    """The rounds and the releases, each checked to follow from the one before."""
    rows, releases, findings, seen = [], [], [], set()
    state: list = []
    recorded: list[tuple[float, float]] = []  # (delta, epsilon) of the lines before: the floor of later ones
    for line, record in enumerate(records):
        floor = max((e for d, e in recorded if d <= record.delta), default=0.0)
        if record.epsilon is not None:
            recorded.append((record.delta, record.epsilon))
        if isinstance(record, LedgerRelease):
            expected_state = extend(state, record.noise_multiplier, 1.0, 1) if record.private else state
            what = f"run {record.run_id} round {record.round} ({record.statistic} release)"
        else:
            key = (record.run_id, record.round)
            if key in seen:
                findings.append(
                    warning(
                        "ledger-duplicate-round",
                        f"run {record.run_id} round {record.round} is in the ledger twice; both count as spent",
                        site,
                    )
                )
            seen.add(key)
            expected_state = (
                extend(state, record.noise_multiplier, record.sample_rate, record.steps) if record.dp else state
            )
            what = f"run {record.run_id} round {record.round}"
        recorded_state = [tuple(step) for step in record.accountant_state]
        if _states_differ(recorded_state, expected_state):
            findings.append(
                critical(
                    "ledger-arithmetic",
                    f"{what}: the accountant state does not follow from the previous entry and this entry's parameters",
                    site,
                )
            )
        state = recorded_state
        if isinstance(record, LedgerRelease):
            releases.append(_release_row(record, state, floor, line, site, findings))
            continue
        rows.append(_round_row(record, state, floor, site, findings) | {"line": line})
        if record.delta >= 1.0 / record.examples:
            findings.append(
                critical(
                    "delta-too-large",
                    f"run {record.run_id} round {record.round}: delta "
                    f"{record.delta:g} >= 1/n = {1.0 / record.examples:.3g} (n={record.examples})",
                    site,
                )
            )
    non_private = [r for r in rows if not r["dp"]]
    if non_private:
        runs = sorted({r["run_id"] for r in non_private})
        findings.append(
            critical(
                "non-private-rounds",
                f"{len(non_private)} NON-PRIVATE round(s) in run(s) "
                f"{', '.join(runs)}: no differential privacy guarantee holds for this site's "
                "data from then on",
                site,
            )
        )
    return rows, releases, findings


def _release_row(
    release: LedgerRelease, state: list, floor: float, line: int, site: str, findings: list[Finding]
) -> dict:
    """A release, its epsilon checked (the second opinion is asked for the site's total only:
    a report of many runs holds many releases)."""
    if release.private:
        what = f"run {release.run_id} round {release.round} ({release.statistic} release)"
        if release.epsilon is None:  # fedmed writes every private release with its epsilon
            raise ValueError(f"{site}: {what} is private but records no epsilon; the ledger line is damaged")
        _check_epsilon(
            release.accountant, state, release.delta, release.epsilon, floor, what=what, site=site, findings=findings
        )
    return {
        "line": line,
        "run_id": release.run_id,
        "round": release.round,
        "timestamp": release.timestamp,
        "statistic": release.statistic,
        "private": release.private,
        "noise_multiplier": release.noise_multiplier,
        "sensitivity": release.sensitivity,
        "noise_std": release.noise_multiplier * release.sensitivity,
        "delta": release.delta,
        "epsilon": release.epsilon,
        "accountant": release.accountant,
        "privacy_unit": release.privacy_unit,
    }


def _release_findings(releases: list[dict], site: str) -> list[Finding]:
    exact: dict[tuple[str, str], int] = {}
    for row in releases:
        if not row["private"]:
            exact[(row["run_id"], row["statistic"])] = exact.get((row["run_id"], row["statistic"]), 0) + 1
    return [
        warning(
            "non-private-release",
            f"run {run}: {statistic} sent exactly {count} time(s), without "
            "differential privacy (privacy.release_exact); no guarantee covers it, the site's epsilon "
            "covers the other releases only",
            site,
        )
        for (run, statistic), count in exact.items()
    ]


def _round_row(entry: LedgerEntry, state: list, floor: float, site: str, findings: list[Finding]) -> dict:
    recorded = entry.epsilon if entry.dp else None
    second = None
    if recorded is not None:
        what = f"run {entry.run_id} round {entry.round}"
        _check_epsilon(entry.accountant, state, entry.delta, recorded, floor, what=what, site=site, findings=findings)
        second = _second_opinion(state, entry.delta, what, site, findings)
        findings += _adaptive_findings(entry, what, site)
    return {
        "run_id": entry.run_id,
        "round": entry.round,
        "timestamp": entry.timestamp,
        "dp": entry.dp,
        "examples": entry.examples,
        "steps": entry.steps,
        "sample_rate": entry.sample_rate,
        "noise_multiplier": entry.noise_multiplier,
        "max_grad_norm": entry.max_grad_norm,
        "delta": entry.delta,
        "epsilon": recorded,
        "epsilon_second_opinion": second,
        "accountant": entry.accountant,
        "max_epsilon": entry.max_epsilon,
        "max_epsilon_per_run": entry.max_epsilon_per_run,
        "privacy_unit": entry.privacy_unit,
        "clip_quantile": entry.clip_quantile,
        "gradient_noise_multiplier": entry.gradient_noise_multiplier,
        "count_noise": entry.count_noise,
        "clip_norm_after": entry.clip_norm_after,
        "clip_norm_ceiling": entry.clip_norm_ceiling,
        "wasted": False,  # set by the run's cross-check when the coordinator discarded the round
    }


def _adaptive_findings(entry: LedgerEntry, what: str, site: str) -> list[Finding]:
    """An adaptive round's gradient noise and count noise must make exactly the joint noise
    multiplier its accountant composed, and its clip norms must stay within the run's
    ceiling (the coordinator bounds honest updates by it)."""
    if entry.clip_quantile is None:
        return []
    gradient, count = entry.gradient_noise_multiplier, entry.count_noise
    after, ceiling = entry.clip_norm_after, entry.clip_norm_ceiling
    if gradient is None or count is None or after is None or ceiling is None or min(gradient, count, after) <= 0:
        return [critical("ledger-arithmetic", f"{what}: adaptive clipping with missing or non-positive fields", site)]
    findings = []
    joint = joint_noise(gradient, count)
    if not math.isclose(joint, entry.noise_multiplier, rel_tol=JOINT_NOISE_TOLERANCE):
        findings.append(
            critical(
                "ledger-arithmetic",
                f"{what}: gradient noise multiplier {gradient:.6g} and count noise {count:.6g} make a joint "
                f"noise multiplier of {joint:.6g}, not the {entry.noise_multiplier:.6g} its accountant composed",
                site,
            )
        )
    if not (0 < entry.max_grad_norm <= ceiling and after <= ceiling):
        findings.append(
            critical(
                "ledger-arithmetic",
                f"{what}: adaptive clip norm {entry.max_grad_norm:.6g} -> {after:.6g} passes the run's ceiling "
                f"{ceiling:.6g} (max_grad_norm), which bounds an honest update",
                site,
            )
        )
    return findings


def _check_epsilon(
    accountant: str,
    state: list,
    delta: float,
    recorded: float,
    floor: float,
    *,
    what: str,
    site: str,
    findings: list[Finding],
) -> None:
    """A recorded epsilon must be what its accountant state gives by the accountant the line
    names; a line of the ledger's accountant never below ``floor``, the largest epsilon recorded
    before at this delta or a smaller one (``PrivacyLedger.epsilon_of``)."""
    try:
        recomputed = accountant_epsilon(accountant, state, delta)
    except ValueError as exc:
        findings.append(critical("ledger-arithmetic", f"{what}: its epsilon cannot be rechecked: {exc}", site))
        return
    if accountant == ACCOUNTANT:
        recomputed = max(recomputed, floor)
    if not math.isclose(recomputed, recorded, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9):
        findings.append(
            critical(
                "ledger-arithmetic",
                f"{what}: recorded epsilon {recorded:.6g} but its accountant state gives {recomputed:.6g} "
                f"({accountant})",
                site,
            )
        )


def _second_opinion(state: list, delta: float, what: str, site: str, findings: list[Finding]) -> float | None:
    """The independent accountant's epsilon for ``state`` (None, with a warning, if it cannot)."""
    try:
        return second_opinion_epsilon(state, delta)
    except ValueError as exc:
        findings.append(warning("second-opinion-unavailable", f"{what}: {exc}", site))
        return None


def _states_differ(a: list, b: list) -> bool:
    if len(a) != len(b):
        return True
    return any(
        sa[2] != sb[2] or not math.isclose(sa[0], sb[0], rel_tol=1e-12) or not math.isclose(sa[1], sb[1], rel_tol=1e-12)
        for sa, sb in zip(a, b)
    )


def _runs(rounds: list[dict], releases: list[dict]) -> list[dict]:
    """One row per run, in the order the site first joined them, with what left the site in it."""
    runs: dict[str, dict] = {}
    for row in rounds:
        run = runs.setdefault(
            row["run_id"],
            {
                "run_id": row["run_id"],
                "rounds": [],
                "started": row["timestamp"],
                "dp": True,
                "noise_multipliers": [],
                "sample_rate": row["sample_rate"],
                "examples": row["examples"],
                "steps": 0,
                "max_grad_norm": row["max_grad_norm"],  # at the run's first round's start
                "clip_quantile": row["clip_quantile"],
                "privacy_unit": row["privacy_unit"],
            },
        )
        run["clip_norm_after"] = row["clip_norm_after"]
        run["rounds"].append(row["round"])
        run["ended"] = row["timestamp"]
        run["dp"] = run["dp"] and row["dp"]
        run["steps"] += row["steps"]
        if row["noise_multiplier"] not in run["noise_multipliers"]:
            run["noise_multipliers"].append(row["noise_multiplier"])
        run["epsilon_after"] = row["epsilon"]
        run["epsilon_second_opinion_after"] = row["epsilon_second_opinion"]
        run["delta"] = row["delta"]
    for run in runs.values():
        run["released"] = _released(run, [r for r in releases if r["run_id"] == run["run_id"]])
    return list(runs.values())


def _released(run: dict, releases: list[dict]) -> list[dict]:
    """What left the site in one run: its model updates, then each kind of release, with the
    mechanism and the epsilon it costs alone (the site's epsilon composes them all, for less
    than the sum)."""
    delta = run["delta"]
    updates = {
        "what": "model update",
        "count": len(run["rounds"]),
        "private": run["dp"],
        "privacy_unit": run["privacy_unit"],
        "mechanism": (
            f"DP-SGD: noise multiplier {', '.join(f'{s:.4g}' for s in run['noise_multipliers'])}, "
            f"{_clip_text(run)}, sample rate {run['sample_rate']:.4g}, {run['steps']} steps"
        )
        if run["dp"]
        else "NON-PRIVATE training",
        # one noise multiplier per run (a run calibrates once); otherwise not one mechanism
        "epsilon_alone": (
            epsilon([(run["noise_multipliers"][0], run["sample_rate"], run["steps"])], delta)
            if run["dp"] and len(run["noise_multipliers"]) == 1
            else None
        ),
    }
    rows = [updates]
    for statistic, private in dict.fromkeys((r["statistic"], r["private"]) for r in releases):
        same = [r for r in releases if r["statistic"] == statistic and r["private"] == private]
        rows.append(
            {
                "what": statistic,
                "count": len(same),
                "private": private,
                "privacy_unit": same[0]["privacy_unit"],
                "mechanism": (
                    f"Gaussian, noise std {same[0]['noise_std']:.4g} (sensitivity {same[0]['sensitivity']:.4g})"
                    if private
                    else "exact, NON-PRIVATE"
                ),
                "epsilon_alone": epsilon([(r["noise_multiplier"], 1.0, 1) for r in same], delta) if private else None,
            }
        )
    return rows


def _clip_text(run: dict) -> str:
    """The run's clip norm: fixed, or where adaptive clipping took it."""
    if run["clip_quantile"] is None or run["clip_norm_after"] is None:
        return f"clip norm {run['max_grad_norm']:g}"
    return (
        f"clip norm {run['max_grad_norm']:g} -> {run['clip_norm_after']:.3g} (adaptive, quantile "
        f"{run['clip_quantile']:g}; the noise multiplier is the joint one of the gradient and the count)"
    )


def _refusal_row(refusal: LedgerRefusal) -> dict:
    return {
        "run_id": refusal.run_id,
        "round": refusal.round,
        "timestamp": refusal.timestamp,
        "reason": refusal.reason,
        "epsilon_before": refusal.epsilon_before,
        "epsilon_would_be": refusal.epsilon_after,
        "delta": refusal.delta,
        "max_epsilon": refusal.max_epsilon,
    }


def _budget_findings(account: SiteAccount) -> list[Finding]:
    budget, spent, site = account.budget, account.epsilon_spent, account.site
    if budget is None or account.non_private_rounds or spent is None:
        return []
    if spent > budget * (1 + RELATIVE_TOLERANCE):
        return [critical("budget-exceeded", f"epsilon {spent:.4g} spent, above the budget {budget:g}", site)]
    if spent > NEARLY_SPENT * budget:
        return [
            warning(
                "budget-nearly-spent",
                f"{spent / budget:.1%} of the budget spent (epsilon {spent:.4g} of "
                f"{budget:g}); {budget - spent:.4g} left",
                site,
            )
        ]
    return []


def _count_as_spent(account: SiteAccount, unreadable: list[int]) -> SiteAccount:
    """An unreadable line spent an unknown amount: the whole budget counts as spent (with no
    budget known, an unbounded spend, as after a non-private round)."""
    budget = account.budget

    def spent(value: float | None) -> float | None:
        return None if budget is None or value is None else max(value, budget)

    return replace(
        account,
        epsilon_spent=spent(account.epsilon_spent),
        epsilon_second_opinion=spent(account.epsilon_second_opinion),
        unreadable_lines=unreadable,
    )


def _budget_left(account: SiteAccount) -> tuple[float | None, float | None]:
    budget, spent = account.budget, account.epsilon_spent
    if budget is None:
        return None, None
    if account.non_private_rounds or spent is None:
        return 0.0, None
    if account.unreadable_lines:  # spent is at least the budget
        return 0.0, spent / budget
    return max(0.0, budget - spent), spent / budget
