"""Privacy-budget reports: a site's ledger and a run directory, as JSON, Markdown and HTML."""

from fedmed.report.build import SCHEMA, build_report
from fedmed.report.write import write_report

__all__ = ["SCHEMA", "build_report", "write_report"]
