"""A site's privacy account, read from its ledger (the authoritative record).

Every entry is re-checked: its epsilon is recomputed from its accountant state, the state
must follow from the previous one and the round's parameters, and the same history is
given to an independent accountant (PLD) for a second opinion.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedmed.privacy.accounting import ACCOUNTANT, epsilon, extend
from fedmed.privacy.ledger import LedgerEntry, LedgerRefusal, line_count, parse_ledger
from fedmed.privacy.second_opinion import SECOND_OPINION, second_opinion_epsilon
from fedmed.report.findings import NEARLY_SPENT, Finding, critical, warning

RELATIVE_TOLERANCE = 1e-6


def site_account(ledger_path: Path, budget: float | None = None) -> tuple[dict, list[Finding]]:
    """The account of the site whose ledger is ``ledger_path``, and what is wrong with it.

    ``budget`` overrides the budget recorded in the ledger (older ledgers lack it).
    """
    ledger_path = Path(ledger_path)
    try:
        text = ledger_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        name = ledger_path.parent.name or str(ledger_path)
        finding = critical("ledger-missing", f"cannot read the ledger {ledger_path}: {exc}", name)
        return _empty_account(name, ledger_path), [finding]
    records, problems = parse_ledger(text)
    entries = [r for r in records if isinstance(r, LedgerEntry)]
    refusals = [r for r in records if isinstance(r, LedgerRefusal)]
    site = entries[0].site if entries else (refusals[0].site if refusals else ledger_path.parent.name)
    lines = line_count(text)
    findings = _line_findings(ledger_path, problems, lines, site)

    rounds, checks = _rounds(entries, site)
    findings += checks
    account = _empty_account(site, ledger_path)
    account.update(
        ledger_lines=lines,
        rounds=rounds,
        runs=_runs(rounds),
        refused=[_refusal_row(r) for r in refusals],
    )
    if entries:
        last = entries[-1]
        non_private = sum(not e.dp for e in entries)
        account.update(
            budget=budget if budget is not None else last.max_epsilon,
            target_epsilon=last.target_epsilon,
            delta=last.delta,
            non_private_rounds=non_private,
            # unbounded (null) once any round was non-private
            epsilon_spent=None if non_private else rounds[-1]["epsilon"],
            epsilon_second_opinion=None if non_private else rounds[-1]["epsilon_second_opinion"],
        )
    elif budget is not None:
        account["budget"] = budget
    findings += _budget_findings(account)
    if refusals:
        findings.append(warning("rounds-refused", f"{len(refusals)} round(s) refused because the budget would "
                                f"have been exceeded (last: run {refusals[-1].run_id}, round {refusals[-1].round})",
                                site))
    account["budget_left"], account["budget_used"] = _budget_left(account)
    return account, findings


def _empty_account(site: str, path: Path) -> dict:
    return {
        "site": site, "ledger": str(path), "ledger_lines": 0, "accountant": ACCOUNTANT,
        "second_opinion_accountant": SECOND_OPINION, "delta": None, "budget": None, "target_epsilon": None,
        "epsilon_spent": 0.0, "epsilon_second_opinion": 0.0, "non_private_rounds": 0,
        "budget_left": None, "budget_used": None, "runs": [], "rounds": [], "refused": [],
    }


def _line_findings(path: Path, problems: list[tuple[int, str]], lines: int, site: str) -> list[Finding]:
    findings = []
    for number, problem in problems:
        if number == lines:
            findings.append(warning("ledger-torn-line", f"{path}: line {number} (the last) is incomplete and was "
                                    f"ignored; a write was cut short ({problem})", site))
        else:
            findings.append(critical("ledger-damaged", f"{path}: line {number} of {lines} cannot be read "
                                     f"({problem}); the ledger cannot prove what the site spent. Restore it "
                                     "from a backup.", site))
    return findings


def _rounds(entries: list[LedgerEntry], site: str) -> tuple[list[dict], list[Finding]]:
    rows, findings, seen = [], [], set()
    state: list = []
    for entry in entries:
        key = (entry.run_id, entry.round)
        if key in seen:
            findings.append(warning("ledger-duplicate-round", f"run {entry.run_id} round {entry.round} is in "
                                    "the ledger twice; both count as spent", site))
        seen.add(key)
        expected_state = extend(state, entry.noise_multiplier, entry.sample_rate, entry.steps) if entry.dp else state
        recorded_state = [tuple(step) for step in entry.accountant_state]
        if _states_differ(recorded_state, expected_state):
            findings.append(critical("ledger-arithmetic", f"run {entry.run_id} round {entry.round}: the accountant "
                                     "state does not follow from the previous entry and this round's "
                                     "parameters", site))
        state = recorded_state
        rows.append(_round_row(entry, state, site, findings))
        if entry.delta >= 1.0 / entry.examples:
            findings.append(critical("delta-too-large", f"run {entry.run_id} round {entry.round}: delta "
                                     f"{entry.delta:g} >= 1/n = {1.0 / entry.examples:.3g} (n={entry.examples})",
                                     site))
    non_private = [r for r in rows if not r["dp"]]
    if non_private:
        runs = sorted({r["run_id"] for r in non_private})
        findings.append(critical("non-private-rounds", f"{len(non_private)} NON-PRIVATE round(s) in run(s) "
                                 f"{', '.join(runs)}: no differential privacy guarantee holds for this site's "
                                 "data from then on", site))
    return rows, findings


def _round_row(entry: LedgerEntry, state: list, site: str, findings: list[Finding]) -> dict:
    recorded = entry.epsilon
    second = None
    if entry.dp and recorded is not None:
        recomputed = epsilon(state, entry.delta)
        if not math.isclose(recomputed, recorded, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9):
            findings.append(critical("ledger-arithmetic", f"run {entry.run_id} round {entry.round}: recorded "
                                     f"epsilon {recorded:.6g} but its accountant state gives {recomputed:.6g}",
                                     site))
        try:
            second = second_opinion_epsilon(state, entry.delta)
        except ValueError as exc:
            findings.append(warning("second-opinion-unavailable", f"run {entry.run_id} round {entry.round}: {exc}",
                                    site))
    return {
        "run_id": entry.run_id, "round": entry.round, "timestamp": entry.timestamp, "dp": entry.dp,
        "examples": entry.examples, "steps": entry.steps, "sample_rate": entry.sample_rate,
        "noise_multiplier": entry.noise_multiplier, "max_grad_norm": entry.max_grad_norm,
        "delta": entry.delta, "epsilon": recorded if entry.dp else None,
        "epsilon_second_opinion": second, "accountant": entry.accountant, "max_epsilon": entry.max_epsilon,
        "privacy_unit": entry.privacy_unit,
        "wasted": False,  # set by the run's cross-check when the coordinator discarded the round
    }


def _states_differ(a: list, b: list) -> bool:
    if len(a) != len(b):
        return True
    return any(sa[2] != sb[2] or not math.isclose(sa[0], sb[0], rel_tol=1e-12)
               or not math.isclose(sa[1], sb[1], rel_tol=1e-12) for sa, sb in zip(a, b))


def _runs(rounds: list[dict]) -> list[dict]:
    """One row per run, in the order the site first joined them."""
    runs: dict[str, dict] = {}
    for row in rounds:
        run = runs.setdefault(row["run_id"], {
            "run_id": row["run_id"], "rounds": [], "started": row["timestamp"], "dp": True,
            "noise_multipliers": [], "sample_rate": row["sample_rate"], "examples": row["examples"],
            "steps": 0,
        })
        run["rounds"].append(row["round"])
        run["ended"] = row["timestamp"]
        run["dp"] = run["dp"] and row["dp"]
        run["steps"] += row["steps"]
        if row["noise_multiplier"] not in run["noise_multipliers"]:
            run["noise_multipliers"].append(row["noise_multiplier"])
        run["epsilon_after"] = row["epsilon"]
        run["epsilon_second_opinion_after"] = row["epsilon_second_opinion"]
        run["delta"] = row["delta"]
    return list(runs.values())


def _refusal_row(refusal: LedgerRefusal) -> dict:
    return {"run_id": refusal.run_id, "round": refusal.round, "timestamp": refusal.timestamp,
            "reason": refusal.reason, "epsilon_before": refusal.epsilon_before,
            "epsilon_would_be": refusal.epsilon_after, "delta": refusal.delta, "max_epsilon": refusal.max_epsilon}


def _budget_findings(account: dict) -> list[Finding]:
    budget, spent, site = account["budget"], account["epsilon_spent"], account["site"]
    if budget is None or account["non_private_rounds"] or spent is None:
        return []
    if spent > budget * (1 + RELATIVE_TOLERANCE):
        return [critical("budget-exceeded", f"epsilon {spent:.4g} spent, above the budget {budget:g}", site)]
    if spent > NEARLY_SPENT * budget:
        return [warning("budget-nearly-spent", f"{spent / budget:.1%} of the budget spent (epsilon {spent:.4g} of "
                        f"{budget:g}); {budget - spent:.4g} left", site)]
    return []


def _budget_left(account: dict) -> tuple[float | None, float | None]:
    budget, spent = account["budget"], account["epsilon_spent"]
    if budget is None:
        return None, None
    if account["non_private_rounds"] or spent is None:
        return 0.0, None
    return max(0.0, budget - spent), spent / budget
