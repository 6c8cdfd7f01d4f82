"""The report as a document for people: headings, text, tables, warnings and figures.

Markdown and HTML are both rendered from this one document, so they always say the same.
Numbers are written with six significant digits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedmed.numbers import MISSING, format_epsilon, format_number
from fedmed.privacy.second_opinion import SECOND_OPINION
from fedmed.protocol import RoundStatus
from fedmed.report.site import SiteAccount


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Alerts:
    items: list[dict]  # findings: level, code, site, message


@dataclass
class Figure:
    name: str  # file name of the PNG, e.g. "epsilon.png"
    caption: str


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)


def report_document(report: dict, figures: list[Figure]) -> Document:
    doc = Document("fedmed privacy report")
    sources = report["sources"]
    what = []
    if sources["run_dir"]:
        what.append(f"run directory {sources['run_dir']}")
    if sources["ledgers"]:
        what.append(f"{len(sources['ledgers'])} site ledger(s)")
    doc.blocks.append(
        Text(
            f"Generated {report['generated']} from {' and '.join(what)}. "
            f"Schema {report['schema']}. Ledger accountant: {report['accountants']['ledger']}. "
            f"Second opinion: {report['accountants']['second_opinion']}."
        )
    )
    counts = report["counts"]
    doc.blocks.append(Heading(f"Warnings ({counts['critical']} critical, {counts['warning']} other)"))
    doc.blocks.append(Alerts(report["warnings"]) if report["warnings"] else Text("No warnings."))
    accounts = [SiteAccount.from_json(a) for a in report["sites"]]
    if accounts:
        doc.blocks += [Heading("Privacy budget per site"), _budget_table(accounts)]
    by_name = {f.name: f for f in figures}
    if "epsilon.png" in by_name:
        doc.blocks.append(by_name["epsilon.png"])
    if report["run"]:
        doc.blocks += _run_blocks(report["run"], by_name)
    for account in accounts:
        doc.blocks += _site_blocks(account)
    return doc


def _budget_table(accounts: list[SiteAccount]) -> Table:
    header = [
        "site",
        "budget (epsilon)",
        "spent (ledger)",
        "ledger accountant",
        f"spent ({SECOND_OPINION.upper()}, second opinion)",
        "left",
        "used",
        "delta",
        "rounds",
        "non-private rounds",
        "refused rounds",
    ]
    rows = []
    for a in accounts:
        used = MISSING if a.budget_used is None else f"{a.budget_used:.1%}"
        dp = not a.non_private_rounds
        rows.append(
            [
                a.site,
                format_number(a.budget),
                format_epsilon(a.epsilon_spent, dp),
                a.accountant.upper(),
                format_epsilon(a.epsilon_second_opinion, dp),
                format_number(a.budget_left),
                used,
                format_number(a.delta),
                format_number(len(a.rounds)),
                format_number(a.non_private_rounds),
                format_number(len(a.refused)),
            ]
        )
    return Table(header, rows)


def _run_blocks(run: dict, figures: dict[str, Figure]) -> list:
    settings = ", ".join(f"{k} {v}" for k, v in run["settings"].items())
    blocks = [
        Heading(f"Run {run['run_id']}"),
        Text(
            f"Run directory {run['run_dir']}: {run['phase']}, {run['rounds_recorded']} of "
            f"{run['rounds_planned']} rounds recorded. Settings: {settings}."
        ),
    ]
    blocks += [figures[name] for name in ("validation.png", "sites.png") if name in figures]
    blocks.append(Heading("Rounds", 3))
    header = [
        "round",
        "aggregated",
        "trained",
        "budget exhausted",
        "rejected",
        "bounded",
        "failed",
        "missing",
        "paid and wasted",
        "train loss",
        "val AUROC",
        "val accuracy",
        "val balanced accuracy",
        "held-out AUROC",
    ]
    rows = []
    for r in run["rounds"]:
        val = r["validation"] or {}
        held_out = r["server_validation"] or {}
        rows.append(
            [
                str(r["round"]),
                format_number(r["aggregated"]),
                _names(r["trained"]),
                _names(r["budget_exhausted"]),
                _names(r["rejected"]),
                _names(r["bounded"]),
                _names(r["failed"]),
                _names(r["missing"]),
                _names(r["wasted"]),
                format_number(r["train_loss"]),
                format_number(val.get("auroc")),
                format_number(val.get("accuracy")),
                format_number(val.get("balanced_accuracy")),
                format_number(held_out.get("auroc")),
            ]
        )
    blocks.append(Table(header, rows))
    blocks.append(Heading("Epsilon per round, as the sites reported it", 3))
    rows = []
    for r in run["rounds"]:
        row = [str(r["round"])]
        for name in run["sites"]:
            site = r["sites"].get(name)
            row.append(
                MISSING
                if site is None or site["status"] != RoundStatus.TRAINED.label
                else format_epsilon(site["epsilon"], site["dp"])
            )
        rows.append(row)
    blocks.append(Table(["round", *run["sites"]], rows))
    return blocks


def _adaptive_clip_text(row: dict) -> str:
    """A round's adaptive clipping in a cell: the quantile, where the clip norm ended, and the
    two noises whose joint multiplier is the round's; MISSING for a fixed clip norm."""
    if row.get("clip_quantile") is None:
        return MISSING
    return (
        f"quantile {format_number(row['clip_quantile'])}, clip norm to {format_number(row['clip_norm_after'], 4)} "
        f"(ceiling {format_number(row['clip_norm_ceiling'])}); noise multiplier "
        f"{format_number(row['gradient_noise_multiplier'], 4)} on the gradient, count noise "
        f"{format_number(row['count_noise'], 4)}"
    )


def _site_blocks(a: SiteAccount) -> list:
    units = sorted({r["privacy_unit"] for r in a.rounds}) or ["image"]
    blocks = [
        Heading(f"Site {a.site}"),
        Text(
            f"Ledger {a.ledger} ({a.ledger_lines} lines).{_chain_text(a.ledger_chain)} "
            f"Accountant {a.accountant} (of the latest line; each round names its own); "
            f"second opinion {a.second_opinion_accountant}. Privacy unit: {', '.join(units)} "
            "(each epsilon bounds what is revealed about one such record; a patient with k "
            "images is protected by about k times an image-level epsilon)."
        ),
    ]
    blocks.append(Heading(f"{a.site}: runs", 3))
    rows = [
        [
            r["run_id"],
            _rounds_text(r["rounds"]),
            format_number(r["dp"]),
            ", ".join(format_number(s) for s in r["noise_multipliers"]),
            format_number(r["sample_rate"]),
            format_number(r["steps"]),
            format_number(r["examples"]),
            format_epsilon(r["epsilon_after"], r["dp"]),
            format_epsilon(r["epsilon_second_opinion_after"], r["dp"]),
            format_number(r["delta"]),
            r["started"],
            r["ended"],
        ]
        for r in a.runs
    ]
    blocks.append(
        Table(
            [
                "run",
                "rounds",
                "DP",
                "noise multiplier",
                "sample rate",
                "steps",
                "examples",
                "epsilon after (ledger)",
                f"epsilon after ({SECOND_OPINION.upper()}, second opinion)",
                "delta",
                "first round at",
                "last round at",
            ],
            rows,
        )
    )
    blocks.append(Heading(f"{a.site}: what left this site", 3))
    blocks.append(
        Text(
            "Every statistic the site sent, per run, from its ledger. Each reply also carries the "
            "public description of the site's guarantee (status, whether DP, steps, epsilon, delta, "
            "noise multiplier). Epsilon alone is what each kind of release would cost by itself; the "
            "site's epsilon composes all private releases (by the ledger's accountant) and is less than their sum."
        )
    )
    rows = [
        [
            r["run_id"],
            w["what"],
            format_number(w["count"]),
            w["mechanism"],
            "yes" if w["private"] else "NO",
            format_number(w["epsilon_alone"]),
            w["privacy_unit"],
        ]
        for r in a.runs
        for w in r["released"]
    ]
    blocks.append(Table(["run", "what", "times", "mechanism", "private", "epsilon alone", "privacy unit"], rows))
    blocks.append(Heading(f"{a.site}: rounds", 3))
    rows = [
        [
            r["run_id"],
            str(r["round"]),
            r["timestamp"],
            format_number(r["dp"]),
            format_number(r["examples"]),
            format_number(r["steps"]),
            format_number(r["sample_rate"]),
            format_number(r["noise_multiplier"]),
            format_number(r["max_grad_norm"]),
            _adaptive_clip_text(r),
            format_number(r["delta"]),
            format_epsilon(r["epsilon"], r["dp"]),
            r["accountant"].upper(),
            format_epsilon(r["epsilon_second_opinion"], r["dp"]),
            "paid, round discarded" if r.get("wasted") else "",
        ]
        for r in a.rounds
    ]
    blocks.append(
        Table(
            [
                "run",
                "round",
                "time",
                "DP",
                "examples",
                "steps",
                "sample rate",
                "noise multiplier",
                "clip norm",
                "adaptive clipping",
                "delta",
                "epsilon (ledger)",
                "accountant",
                f"epsilon ({SECOND_OPINION.upper()}, second opinion)",
                "wasted",
            ],
            rows,
        )
    )
    if a.audit is not None:
        blocks += _audit_blocks(a)
    if a.refused:
        blocks.append(Heading(f"{a.site}: refused rounds", 3))
        rows = [
            [
                r["run_id"],
                str(r["round"]),
                r["timestamp"],
                format_number(r["epsilon_before"]),
                format_number(r["epsilon_would_be"]),
                format_number(r["max_epsilon"]),
                r["reason"],
            ]
            for r in a.refused
        ]
        blocks.append(
            Table(["run", "round", "time", "epsilon before", "epsilon it would reach", "budget", "reason"], rows)
        )
    return blocks


def _audit_blocks(a: SiteAccount) -> list:
    """What an attacker learnt in ``fedmed audit``: lower bounds and attack AUCs, never proofs of privacy."""
    assert a.audit is not None
    blocks: list = [Heading(f"{a.site}: empirical audit (run {a.audit['run_id']})", 3)]
    canary = a.audit["canary_audit"]
    if canary is not None:
        verdict = (
            "ABOVE the ledger's epsilon: the claim is proven wrong"
            if a.epsilon_spent is not None and canary["epsilon_lower_bound"] > a.epsilon_spent
            else "below the ledger's epsilon, as it must be (a lower bound below the claim does not prove the claim)"
        )
        blocks.append(
            Text(
                f"Canary audit (one training run, Steinke, Nasr & Jagielski 2023): {canary['correct']} of "
                f"{canary['guesses']} guesses right about {canary['canaries']} canaries, so epsilon >= "
                f"{format_number(canary['epsilon_lower_bound'])} at delta {format_number(canary['delta'])} with "
                f"{canary['confidence']:.0%} confidence; {verdict}."
            )
        )
    blocks.append(
        Text(
            "Membership inference by the site on its own final model: its training patients against its "
            "validation patients. AUC 0.5 is guessing; the interval is 95% (patients resampled). Computed "
            "at the site; it never left it."
        )
    )
    rows = [
        [
            m["attack"],
            format_number(m["auc"]),
            f"{format_number(m['interval'][0])} - {format_number(m['interval'][1])}",
            format_number(m["members"]),
            format_number(m["non_members"]),
        ]
        for m in a.audit["membership"]
    ]
    blocks.append(Table(["attack", "AUC", "95% interval", "training patients", "validation patients"], rows))
    return blocks


def _chain_text(chain: dict | None) -> str:
    """The hash chain's state in one sentence (nothing for a ledger that could not be read or is empty)."""
    if chain is None or chain["status"] == "empty":
        return ""
    if chain["status"] == "broken":
        return f" Hash chain: BROKEN at line {chain['first_bad_line']}."
    if chain["status"] == "unchained":
        return " Hash chain: none (written by an older fedmed; edits cannot be detected)."
    if chain["status"] == "partly-chained":
        return (
            f" Hash chain: intact from line {chain['unchained_lines'] + 1}; the {chain['unchained_lines']} "
            "line(s) before it were written by an older fedmed."
        )
    return " Hash chain: intact."


def _names(values) -> str:
    return ", ".join(values) if values else MISSING


def _rounds_text(rounds: list[int]) -> str:
    if rounds == list(range(rounds[0], rounds[-1] + 1)) and len(rounds) > 1:
        return f"{rounds[0]}-{rounds[-1]}"
    return ", ".join(str(r) for r in rounds)
