"""``fedmed-report``: how much privacy budget each site has spent, in which runs and rounds.

    fedmed-report --ledger ~/.fedmed/sites/st-mary/ledger.jsonl   # a hospital's own record
    fedmed-report RUN_DIR                                        # the coordinator's view of a run

Writes privacy-report.json (for automation), privacy-report.md (for a ticket or an email)
and privacy-report.html (self-contained, with plots; the plots also as PNG files).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedmed.report.write import FORMATS
from fedmed.runtime import entry_point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedmed-report",
        description="Privacy-budget report from a site's ledger (authoritative, kept at the hospital) "
        "and/or a run directory (the coordinator's record).",
    )
    p.add_argument("run_dir", type=Path, nargs="?", help="a fedmed-server or fedmed-simulate run directory")
    p.add_argument(
        "--ledger",
        type=Path,
        action="append",
        default=[],
        metavar="LEDGER",
        help="a site's privacy ledger (repeatable)",
    )
    p.add_argument(
        "--budget", type=float, help="the site's epsilon budget, for ledgers written before fedmed recorded it"
    )
    p.add_argument(
        "--out", type=Path, help="output folder (default: RUN_DIR/report, or ./privacy-report-SITE for one ledger)"
    )
    p.add_argument(
        "--format",
        default=",".join(FORMATS),
        help=f"comma-separated formats out of {', '.join(FORMATS)} (default: all)",
    )
    p.add_argument(
        "--fail-on-critical",
        action="store_true",
        help="exit with status 3 when the report has a critical finding (for automated checks)",
    )
    return p


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from fedmed.report import build_report, write_report

    formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
    try:
        if args.run_dir is None and not args.ledger:
            raise ValueError("give a run directory, a site ledger (--ledger LEDGER), or both")
        for ledger in args.ledger:
            if not ledger.is_file():
                raise FileNotFoundError(
                    f"no ledger at {ledger}; a site's ledger is STATE_DIR/ledger.jsonl "
                    "of its fedmed-client (default ~/.fedmed/sites/SITE/ledger.jsonl)"
                )
        if args.budget is not None and args.budget <= 0:
            raise ValueError(f"--budget must be a positive epsilon, got {args.budget:g}")
        report = build_report(args.run_dir, args.ledger, args.budget)
        paths = write_report(report, _out_dir(args, report), formats)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    _print_summary(report)
    for path in paths:
        print(f"wrote {path}")
    return 3 if args.fail_on_critical and report["counts"]["critical"] else 0


def _out_dir(args: argparse.Namespace, report: dict) -> Path:
    if args.out is not None:
        return args.out
    if args.run_dir is not None:
        return args.run_dir / "report"
    sites = [account["site"] for account in report["sites"]]
    return Path(f"privacy-report-{sites[0]}" if len(sites) == 1 else "privacy-report")


def _print_summary(report: dict) -> None:
    from fedmed.numbers import format_epsilon, format_number
    from fedmed.report.findings import finding_line

    for account in report["sites"]:
        dp = not account["non_private_rounds"]
        print(
            f"{account['site']}: epsilon {format_epsilon(account['epsilon_spent'], dp)} "
            f"({account['accountant'].upper()}), {format_epsilon(account['epsilon_second_opinion'], dp)} "
            f"({account['second_opinion_accountant'].upper()}, second opinion) "
            f"at delta {format_number(account['delta'])}; "
            f"budget {format_number(account['budget'])}, left {format_number(account['budget_left'])}; "
            f"{len(account['rounds'])} rounds in {len(account['runs'])} run(s)"
        )
    if report["run"]:
        run = report["run"]
        print(
            f"run {run['run_id']}: {run['phase']}, {run['rounds_recorded']}/{run['rounds_planned']} rounds, "
            f"sites {', '.join(run['sites']) or 'none'}"
        )
    for item in report["warnings"]:
        print(finding_line(item))
