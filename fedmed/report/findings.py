"""Warnings a privacy report raises, with a stable code for automation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

CRITICAL = "critical"
WARNING = "warning"

# code -> what it means (documented in the report schema)
CODES = {
    "non-private-rounds": "rounds were trained without differential privacy: no guarantee holds",
    "non-private-release": "a site sent a statistic exactly, without differential privacy (privacy.release_exact)",
    "budget-exceeded": "the site's spent epsilon is above its budget",
    "budget-nearly-spent": "more than 80% of the site's budget is spent",
    "delta-too-large": "a round ran with delta >= 1/n, which permits leaking a whole record",
    "ledger-missing": "the ledger file does not exist or cannot be read",
    "ledger-damaged": "a ledger line other than the last cannot be read: the whole budget counts as spent",
    "ledger-torn-line": "the ledger's last line is incomplete (a write cut short): what it spent is unknown, so "
    "the whole budget counts as spent and the site refuses to train until the ledger is "
    "restored from a backup",
    "ledger-chain-broken": "a ledger line does not link to the line before it: a line was edited, inserted or removed",
    "ledger-unchained": "ledger lines written before the hash chain existed: an edit to them cannot be detected",
    "ledger-arithmetic": "a ledger entry's epsilon, accountant state or adaptive clipping does not follow from its "
    "parameters",
    "ledger-duplicate-round": "the ledger holds the same run and round twice",
    "ledger-missing-round": "the run directory says the site trained a round its ledger lacks",
    "ledger-extra-round": "the ledger holds a round of this run that the run directory does not record",
    "epsilon-mismatch": "the epsilon a site reported to the coordinator differs from its ledger",
    "second-opinion-unavailable": "the independent accountant could not evaluate a history",
    "rounds-refused": "the site refused rounds because its budget would have been exceeded",
    "sites-dropped": "sites that were asked to train did not return a usable update",
    "budget-wasted": "sites paid privacy budget for a round the coordinator discarded (too few valid updates)",
    "updates-bounded": "the coordinator scaled down an update longer than the norm bound or capped a claimed weight",
    "audit-above-ledger": "an empirical audit (fedmed audit) found a lower bound on epsilon above what the ledger "
    "records: the model reveals more than the ledger allows",
    "audit-unreadable": "the audit file beside the ledger cannot be read",
    "secure-aggregation-failed": "too few sites completed secure aggregation: nothing was unmasked, the round "
    "changed nothing",
}

NEARLY_SPENT = 0.8


@dataclass(frozen=True)
class Finding:
    level: str  # "critical" or "warning"
    code: str
    message: str
    site: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def critical(code: str, message: str, site: str | None = None) -> Finding:
    return Finding(CRITICAL, code, message, site)


def warning(code: str, message: str, site: str | None = None) -> Finding:
    return Finding(WARNING, code, message, site)


def finding_line(item: dict) -> str:
    """A finding (as in a report's ``warnings``) on one line of console text."""
    label = "CRITICAL" if item["level"] == CRITICAL else "warning"
    site = f"{item['site']}: " if item["site"] else ""
    return f"{label} [{item['code']}] {site}{item['message']}"
