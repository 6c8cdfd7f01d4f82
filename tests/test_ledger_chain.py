"""The ledger's hash chain: an edited, inserted or removed line shows, at the site and in the report."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import GENESIS, LedgerError, PrivacyLedger, verify_chain
from fedmed.privacy.release import SiteReleases
from fedmed.report import build_report, write_report
from tests.privacy_helpers import run_rounds

PLAN = PrivacyConfig(target_epsilon=2.0, max_epsilon=2.2, planned_rounds=2)
CHAIN_CODES = {"ledger-chain-broken", "ledger-unchained"}


@pytest.fixture(scope="module")
def chained_text(tmp_path_factory) -> str:
    """A real ledger's text: a noisy validation release, two rounds, then a refused round."""
    path = tmp_path_factory.mktemp("chain") / "ledger.jsonl"
    releases = SiteReleases(PrivacyLedger(path), PLAN, "site-a", "run-a", unit="image", records=64, evaluations=2)
    assert releases.noisy(0, "validation", np.zeros(12), 1.0) is not None
    run_rounds(path, 3, PLAN)
    text = path.read_text(encoding="utf-8")
    kinds = [json.loads(line).get("kind", "round") for line in text.splitlines()]
    assert kinds == ["release", "round", "round", "refusal"]
    return text


def write(tmp_path: Path, lines: list[str], name: str = "ledger.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def sha256(line: str) -> str:
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


def findings(path: Path, level: str | None = None) -> list[dict]:
    return [w for w in build_report(None, [path])["warnings"] if level is None or w["level"] == level]


def test_an_untouched_ledger_verifies_and_its_report_has_no_chain_finding(chained_text, tmp_path):
    lines = chained_text.splitlines()
    links = [json.loads(line)["previous"] for line in lines]
    assert links == [GENESIS, *(sha256(line) for line in lines[:-1])], "each line links to the bytes before it"
    check = verify_chain(chained_text)
    assert check.intact and check.status == "chained" and (check.chained, check.unchained) == (4, 0)
    path = write(tmp_path, lines)
    assert len(PrivacyLedger(path).records) == 4
    report = build_report(None, [path])
    assert not CHAIN_CODES & {w["code"] for w in report["warnings"]}
    assert report["counts"]["critical"] == 0, report["warnings"]
    assert report["sites"][0]["ledger_chain"] == {"status": "chained", "chained_lines": 4, "unchained_lines": 0,
                                                  "first_bad_line": None}


def test_an_edited_epsilon_breaks_the_chain_at_the_next_line(chained_text, tmp_path):
    lines = chained_text.splitlines()
    lines[1], edits = re.subn(r'"epsilon": [0-9.]+', '"epsilon": 0.5', lines[1])  # round 1 claims to spend less
    assert edits == 1
    path = write(tmp_path, lines)
    check = verify_chain(path.read_text())
    assert (check.first_bad_line, check.status) == (3, "broken")
    assert check.problem.startswith("line 3 does not follow from line 2: a line was edited, inserted or removed")
    [broken] = [w for w in findings(path, "critical") if w["code"] == "ledger-chain-broken"]
    assert "line 3 does not follow from line 2" in broken["message"] and str(path) in broken["message"]
    with pytest.raises(LedgerError, match=r"ledger\.jsonl: line 3 does not follow from line 2.*Restore the ledger"):
        PrivacyLedger(path)
    report = build_report(None, [path])
    write_report(report, tmp_path / "out", ("md",))
    text = (tmp_path / "out" / "privacy-report.md").read_text()
    assert "**CRITICAL** [ledger-chain-broken]" in text and "Hash chain: BROKEN at line 3." in text


def test_an_edit_no_arithmetic_check_sees_is_caught_by_the_chain_alone(chained_text, tmp_path):
    lines = chained_text.splitlines()
    timestamp = json.loads(lines[2])["timestamp"]
    lines[2] = lines[2].replace(timestamp, "2020-01-01T00:00:00+00:00")
    path = write(tmp_path, lines)
    assert {w["code"] for w in findings(path, "critical")} == {"ledger-chain-broken"}
    assert verify_chain(path.read_text()).first_bad_line == 4


def test_a_removed_line_is_reported_where_the_gap_is(chained_text, tmp_path):
    lines = chained_text.splitlines()
    gap = write(tmp_path, [lines[0], *lines[2:]], "gap.jsonl")  # round 1 removed
    check = verify_chain(gap.read_text())
    assert check.first_bad_line == 2 and check.problem.startswith("line 2 does not follow from line 1")
    assert any("line 2 does not follow from line 1" in w["message"] for w in findings(gap, "critical")
               if w["code"] == "ledger-chain-broken")
    with pytest.raises(LedgerError, match="line 2 does not follow from line 1"):
        PrivacyLedger(gap)
    headless = write(tmp_path, lines[1:], "headless.jsonl")  # the first line removed
    check = verify_chain(headless.read_text())
    assert check.first_bad_line == 1 and "line 1 does not follow from the start of the ledger" in check.problem


def test_an_older_unchained_ledger_loads_warns_and_continues_chained(chained_text, tmp_path):
    old_lines = []
    for line in chained_text.splitlines():  # as a fedmed before the chain wrote them
        record = json.loads(line)
        del record["previous"]
        old_lines.append(json.dumps(record, sort_keys=True, allow_nan=False))
    path = write(tmp_path, old_lines)
    old_text = path.read_text()
    check = verify_chain(old_text)
    assert check.intact and check.status == "unchained" and check.unchained == 4
    assert len(PrivacyLedger(path).records) == 4
    [unchained] = [w for w in findings(path) if w["code"] in CHAIN_CODES]
    assert unchained["code"] == "ledger-unchained" and unchained["level"] == "warning"
    assert "cannot be detected" in unchained["message"]

    run_rounds(path, 1, PrivacyConfig(target_epsilon=3.0, max_epsilon=5.0, planned_rounds=1), run_id="run-b")
    text = path.read_text()
    assert text.startswith(old_text), "the old lines are written back byte for byte"
    new_line = text.splitlines()[-1]
    assert json.loads(new_line)["previous"] == sha256(old_lines[-1])
    check = verify_chain(text)
    assert check.intact and check.status == "partly-chained" and (check.chained, check.unchained) == (1, 4)
    assert [w["code"] for w in findings(path) if w["code"] in CHAIN_CODES] == ["ledger-unchained"]
    assert [e.run_id for e in PrivacyLedger(path).entries] == ["run-a", "run-a", "run-b"]

    edited = write(tmp_path, [*old_lines[:-1], old_lines[-1].replace("budget exhausted", "budget spent"), new_line],
                   "edited.jsonl")
    assert verify_chain(edited.read_text()).first_bad_line == 5, "the last old line is protected by the first link"


def test_an_unchained_line_after_chained_ones_breaks_the_chain(chained_text, tmp_path):
    lines = chained_text.splitlines()
    record = json.loads(lines[1])
    del record["previous"]
    path = write(tmp_path, [*lines, json.dumps(record, sort_keys=True)])
    check = verify_chain(path.read_text())
    assert check.first_bad_line == 5 and "has no link to the line before it" in check.problem
    with pytest.raises(LedgerError, match="line 5 has no link"):
        PrivacyLedger(path)


def test_a_torn_last_line_keeps_the_chain_but_is_critical_and_never_dropped(chained_text, tmp_path):
    lines = chained_text.splitlines()
    path = tmp_path / "ledger.jsonl"
    torn = chained_text + lines[-1][:40]  # a write cut short
    path.write_text(torn, encoding="utf-8")
    assert verify_chain(path.read_text()).intact, "a torn line is not an edit"
    levels = {(w["code"], w["level"]) for w in findings(path)}
    assert ("ledger-torn-line", "critical") in levels and not {code for code, _ in levels} & CHAIN_CODES
    with pytest.raises(LedgerError, match="line 5, the last, cannot be read"):
        PrivacyLedger(path)
    with pytest.raises(LedgerError):
        run_rounds(path, 1, PLAN, first_round=4)
    assert path.read_text() == torn, "no write drops the torn line"
