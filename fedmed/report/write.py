"""Write a report's files: JSON, Markdown, HTML and the PNG figures."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from fedmed.files import private_dir, write_atomic
from fedmed.report.document import report_document
from fedmed.report.findings import CRITICAL, finding_line
from fedmed.report.plots import report_figures
from fedmed.report.render import to_html, to_markdown

FORMATS = ("json", "md", "html")
STEM = "privacy-report"


def write_report(report: dict, out_dir: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Write ``report`` into ``out_dir`` in ``formats``; returns the files written."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown report format(s) {', '.join(sorted(unknown))}; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    written = []
    if "json" in formats:
        text = json.dumps(_finite_only(report), indent=2, sort_keys=True, allow_nan=False) + "\n"
        written.append(_write(out_dir / f"{STEM}.json", text.encode("utf-8")))
    if "md" in formats or "html" in formats:
        figures, images = report_figures(report)
        for name, png in images.items():
            written.append(_write(out_dir / name, png))
        document = report_document(report, figures)
        if "md" in formats:
            written.append(_write(out_dir / f"{STEM}.md", to_markdown(document).encode("utf-8")))
        if "html" in formats:
            written.append(_write(out_dir / f"{STEM}.html", to_html(document, images).encode("utf-8")))
    return written


def write_run_report(run_dir: Path) -> Path | None:
    """The coordinator's report of a finished run, in RUN_DIR/report; returns its HTML page.

    Used at the end of fedmed-server and fedmed-simulate runs. A report that cannot be
    made is said on stderr and never fails the run (``fedmed-report RUN_DIR`` retries it).
    """
    from fedmed.report.build import build_report

    try:
        report = build_report(run_dir)
        written = write_report(report, private_dir(Path(run_dir) / "report"))  # owner-only, like the run
    except Exception as error:  # noqa: BLE001 - the run itself has succeeded
        print(f"warning: no privacy report written for {run_dir}: {type(error).__name__}: {error}", file=sys.stderr)
        return None
    for item in report["warnings"]:
        if item["level"] == CRITICAL:
            print(finding_line(item), file=sys.stderr)
    return next(p for p in written if p.suffix == ".html")


def _write(path: Path, content: bytes) -> Path:
    write_atomic(path, content)
    return path


def _finite_only(value):
    """``value`` with every NaN or infinity replaced by None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_only(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_only(v) for v in value]
    return value
