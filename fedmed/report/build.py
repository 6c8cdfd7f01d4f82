"""Assemble a privacy report (the JSON document every format is rendered from).

Schema ``fedmed-privacy-report/1`` (docs/privacy-report.md describes every field):

    schema, generated, sources          what was read, when
    run                                 the coordinator's view (null for a ledger-only report)
    sites                               one account per ledger read (see report.site)
    warnings                            findings: level, code, site, message
    counts                              number of critical findings and of warnings
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from fedmed.privacy.pld import DISCRETISATION, REFINE_BELOW
from fedmed.report.findings import CODES, CRITICAL, Finding
from fedmed.report.run import cross_check, ledger_paths, mark_wasted, run_view
from fedmed.report.site import ledger_account

SCHEMA = "fedmed-privacy-report/1"


def build_report(run_dir: Path | None = None, ledgers: Sequence[Path] = (), budget: float | None = None) -> dict:
    """The report of a run directory, of site ledgers, or of both.

    A run directory's own site ledgers (``RUN_DIR/sites/*/ledger.jsonl``) are read too.
    Raises FileNotFoundError when the run directory is not one.
    """
    if run_dir is None and not ledgers:
        raise ValueError("give a run directory, a site ledger (--ledger), or both")
    findings: list[Finding] = []
    view = None
    ledgers = [Path(p) for p in ledgers]
    if run_dir is not None:
        view, found = run_view(Path(run_dir))
        findings += found
        ledgers = [*ledgers, *(p for p in ledger_paths(Path(run_dir)) if p not in ledgers)]
    accounts = []
    for path in ledgers:
        account, found = ledger_account(path, budget)
        accounts.append(account)
        findings += found
    if view is not None:
        findings += cross_check(view, accounts)
        accounts = [mark_wasted(view, account) for account in accounts]  # paid for a discarded round
    findings.sort(key=lambda f: (f.level != CRITICAL, f.site or "", f.code))
    return {
        "schema": SCHEMA,
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sources": {"run_dir": str(run_dir) if run_dir is not None else None, "ledgers": [str(p) for p in ledgers]},
        "accountants": {
            "ledger": f"pld: privacy loss distribution accountant of Google's dp-accounting, pessimistic "
            f"upper bound, add-or-remove neighbours, discretisation {DISCRETISATION:g} (a tenth of it below "
            f"epsilon {REFINE_BELOW:g}; the site's own bound; "
            "lines written before fedmed used it say rdp, and the site's epsilon never fell below them)",
            "second_opinion": "rdp: Renyi DP of the Poisson-subsampled Gaussian mechanism, Opacus's analysis "
            "(an independent implementation of a looser method)",
        },
        "run": view,
        "sites": [account.to_json() for account in accounts],
        "warnings": [f.to_dict() for f in findings],
        "warning_codes": {code: CODES[code] for code in sorted({f.code for f in findings})},
        "counts": {
            "critical": sum(f.level == CRITICAL for f in findings),
            "warning": sum(f.level != CRITICAL for f in findings),
        },
    }
