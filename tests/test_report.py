"""`fedmed-report`: a site's ledger and a run directory, in JSON, Markdown and HTML."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant
from PIL import Image

from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.second_opinion import second_opinion_epsilon
from fedmed.report import build_report, write_report
from tests.federation_helpers import BIN
from tests.privacy_helpers import run_rounds

REPO = Path(__file__).resolve().parent.parent
ARTEFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory) -> Path:
    """A real ledger: run-a trains 2 rounds, run-b trains 1 and is refused its 2nd."""
    path = tmp_path_factory.mktemp("ledger") / "privacy-ledger.jsonl"
    run_rounds(path, 2, PrivacyConfig(target_epsilon=2.0, max_epsilon=3.2, planned_rounds=2), run_id="run-a")
    run_rounds(path, 2, PrivacyConfig(target_epsilon=3.0, max_epsilon=3.2, planned_rounds=1), run_id="run-b")
    return path


@pytest.fixture(scope="module")
def ledger_report(ledger, tmp_path_factory):
    out = tmp_path_factory.mktemp("ledger-report")
    report = build_report(None, [ledger])
    write_report(report, out)
    return report, out


def markdown_table(text: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first table after ``heading`` in a Markdown document."""
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_the_ledger_and_its_refusal_are_what_the_site_did(ledger):
    entries = PrivacyLedger(ledger).entries
    assert [(e.run_id, e.round) for e in entries] == [("run-a", 1), ("run-a", 2), ("run-b", 1)]
    assert [(r.run_id, r.round) for r in PrivacyLedger(ledger).refusals] == [("run-b", 2)]


def test_json_numbers_equal_the_ledger(ledger, ledger_report):
    _, out = ledger_report
    report = json.loads((out / "privacy-report.json").read_text())
    assert report["schema"] == "fedmed-privacy-report/1"
    entries = PrivacyLedger(ledger).entries
    [site] = report["sites"]
    assert len(site["rounds"]) == len(entries)
    for row, entry in zip(site["rounds"], entries):
        for key in ("run_id", "round", "examples", "steps", "sample_rate", "noise_multiplier", "max_grad_norm",
                    "delta", "epsilon", "timestamp"):
            assert row[key] == getattr(entry, key), key
    assert site["epsilon_spent"] == entries[-1].epsilon and site["budget"] == 3.2
    assert site["budget_left"] == pytest.approx(3.2 - entries[-1].epsilon)
    assert [r["run_id"] for r in site["runs"]] == ["run-a", "run-b"]
    assert site["runs"][0]["epsilon_after"] == entries[1].epsilon
    assert [(r["run_id"], r["round"]) for r in site["refused"]] == [("run-b", 2)]
    assert site["refused"][0]["epsilon_would_be"] > 3.2
    codes = {w["code"] for w in report["warnings"]}
    assert {"budget-nearly-spent", "rounds-refused"} <= codes
    assert "non-private-rounds" not in codes and report["counts"]["critical"] == 0


def test_markdown_numbers_equal_the_ledger(ledger, ledger_report):
    _, out = ledger_report
    text = (out / "privacy-report.md").read_text()
    entries = PrivacyLedger(ledger).entries
    rows = markdown_table(text, "site-a: rounds")
    assert len(rows) == len(entries)
    columns = {"noise multiplier": "noise_multiplier", "sample rate": "sample_rate", "delta": "delta",
               "epsilon (ledger)": "epsilon", "clip norm": "max_grad_norm"}
    for row, entry in zip(rows, entries):
        assert (row["run"], int(row["round"]), int(row["steps"]), int(row["examples"])) == \
            (entry.run_id, entry.round, entry.steps, entry.examples)
        for column, field in columns.items():
            assert float(row[column]) == float(f"{getattr(entry, field):.6g}"), column
    [budget] = markdown_table(text, "Privacy budget per site")
    assert float(budget["spent (ledger)"]) == float(f"{entries[-1].epsilon:.6g}")
    assert float(budget["budget (epsilon)"]) == 3.2 and int(budget["refused rounds"]) == 1
    assert "[budget-nearly-spent]" in text


def test_the_second_opinion_is_looser_and_uses_the_same_parameters(ledger, ledger_report):
    report, _ = ledger_report
    rows = report["sites"][0]["rounds"]
    for row, entry in zip(rows, PrivacyLedger(ledger).entries):
        second = row["epsilon_second_opinion"]
        assert 0 < row["epsilon"] <= second, "RDP, the second opinion, is at least the ledger's PLD bound"
        assert second == second_opinion_epsilon(entry.accountant_state, entry.delta)
        prv = PRVAccountant()  # a third, independent method: Opacus's PRV upper bound
        prv.history = list(entry.accountant_state)
        assert row["epsilon"] == pytest.approx(prv.get_epsilon(delta=entry.delta, eps_error=0.01), abs=0.05)


def test_the_html_page_is_self_contained_and_its_images_are_png(ledger_report):
    _, out = ledger_report
    page = (out / "privacy-report.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    text = re.sub(r'src="data:[^"]*"', "", page)
    assert not re.search(r"https?:|href=|url\(|@import|<link|<script", text, re.I), "no external reference"
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        data = base64.b64decode(source.split(",", 1)[1])
        assert data.startswith(PNG_SIGNATURE)
        assert Image.open(io.BytesIO(data)).size[0] > 100
    assert (out / "epsilon.png").read_bytes().startswith(PNG_SIGNATURE)


def test_a_torn_or_damaged_line_is_critical_and_counts_the_whole_budget_as_spent(ledger, tmp_path):
    """What an unreadable line spent is unknown: the report still reads the rest, says which
    line, and shows nothing left of the budget, as the site itself refuses to train."""
    torn = tmp_path / "torn.jsonl"
    torn.write_text(ledger.read_text() + '{"site": "site-a", "run_id": "run-b", "rou')
    report = build_report(None, [torn])
    [finding] = [w for w in report["warnings"] if w["code"] == "ledger-torn-line"]
    assert finding["level"] == "critical" and f"{torn}: line 5 (the last)" in finding["message"]
    [site] = report["sites"]
    assert len(site["rounds"]) == 3 and site["budget"] == 3.2 and site["unreadable_lines"] == [5]
    assert site["epsilon_spent"] >= 3.2 and site["budget_left"] == 0.0 and site["budget_used"] >= 1.0
    assert "budget-nearly-spent" not in {w["code"] for w in report["warnings"]}, "spent, not nearly"
    write_report(report, tmp_path / "torn-out", ("md",))
    text = (tmp_path / "torn-out" / "privacy-report.md").read_text()
    [row] = markdown_table(text, "Privacy budget per site")
    assert "**CRITICAL** [ledger-torn-line]" in text and float(row["left"]) == 0.0
    assert float(row["spent (ledger)"]) >= 3.2
    lines = ledger.read_text().splitlines()
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("\n".join([lines[0], lines[1][:40], *lines[2:]]) + "\n")
    report = build_report(None, [damaged])
    assert {"ledger-damaged", "ledger-arithmetic"} <= {w["code"] for w in report["warnings"]
                                                       if w["level"] == "critical"}
    assert report["sites"][0]["budget_left"] == 0.0 and report["sites"][0]["unreadable_lines"] == [2]
    write_report(report, tmp_path / "out")
    assert "**CRITICAL** [ledger-damaged]" in (tmp_path / "out" / "privacy-report.md").read_text()


def test_non_private_rounds_and_a_large_delta_are_loud(tmp_path):
    path = tmp_path / "ledger.jsonl"
    run_rounds(path, 1, PrivacyConfig(target_epsilon=2.0, planned_rounds=1), run_id="run-a")
    run_rounds(path, 1, PrivacyConfig(dp=False), run_id="baseline", first_round=1)
    report = build_report(None, [path])
    critical = {w["code"] for w in report["warnings"] if w["level"] == "critical"}
    assert "non-private-rounds" in critical
    assert report["sites"][0]["epsilon_spent"] is None and report["sites"][0]["budget_left"] in (None, 0.0)
    write_report(report, tmp_path / "out", ("md",))
    text = (tmp_path / "out" / "privacy-report.md").read_text()
    assert "**CRITICAL** [non-private-rounds]" in text and "inf (non-private)" in text
    records = [json.loads(line) for line in path.read_text().splitlines()]
    records[0]["delta"] = 0.5  # a delta no fedmed site accepts, from a foreign or edited ledger
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert "delta-too-large" in {w["code"] for w in build_report(None, [path])["warnings"]}


@pytest.mark.slow
def test_the_command_line(ledger, tmp_path):
    missing = subprocess.run([str(BIN / "fedmed-report"), "--ledger", str(tmp_path / "nope.jsonl")],
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "no ledger at" in missing.stderr and "nope.jsonl" in missing.stderr
    done = subprocess.run([str(BIN / "fedmed-report"), "--ledger", str(ledger), "--out", str(tmp_path / "r"),
                           "--format", "json,md"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "site-a: epsilon" in done.stdout and "[budget-nearly-spent]" in done.stdout
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["epsilon.png", "privacy-report.json",
                                                                  "privacy-report.md"]
    wrong = subprocess.run([str(BIN / "fedmed-report"), "--ledger", str(ledger), "--format", "pdf",
                            "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown report format(s) pdf" in wrong.stderr


# -- the coordinator's report of a run --------------------------------------------------


def test_a_simulation_writes_its_run_report(simulation):
    results = simulation[0]
    report = json.loads((results / "federated" / "report" / "privacy-report.json").read_text())
    run = report["run"]
    assert run["phase"] == "completed" and [r["round"] for r in run["rounds"]] == [1, 2]
    assert run["sites"] == ["site-1", "site-2", "site-3"]
    assert report["counts"]["critical"] == 0, report["warnings"]
    for account in report["sites"]:
        site_ledger = PrivacyLedger(account["ledger"])
        ledger = site_ledger.entries
        assert account["epsilon_spent"] == pytest.approx(site_ledger.epsilon(ledger[-1].delta), rel=1e-12)
        assert account["epsilon_spent"] > ledger[-1].epsilon, "the final validation was released after round 2"
        assert 0 < account["epsilon_spent"] < account["epsilon_second_opinion"], "RDP's bound, looser, of the same total"
        assert [r["sites"][account["site"]]["epsilon"] for r in run["rounds"]] == \
            pytest.approx([e.epsilon for e in ledger], rel=1e-9)
        # what left the site: two DP-SGD updates, the noisy record count once, the noisy
        # validation counts of the two evaluated models (0 and 2); nothing exact
        [released] = [r["released"] for r in account["runs"]]
        assert [(w["what"], w["count"], w["private"]) for w in released] == \
            [("model update", 2, True), ("validation", 2, True), ("examples", 1, True)]
        assert all(w["epsilon_alone"] > 0 and w["privacy_unit"] == "patient" for w in released)
    assert not [w for w in report["warnings"] if w["code"] == "non-private-release"]
    assert {a["site"]: a["budget"] for a in report["sites"]} == {"site-1": 8.0, "site-2": 8.0, "site-3": 4.0}
    # the simulation evaluates only the final model (evaluate_every = 2)
    assert [r["server_validation"] is not None for r in run["rounds"]] == [False, True]
    assert run["rounds"][1]["server_validation"]["auroc"] is not None


def _up_to_round(ledger: Path, round_number: int) -> list[str]:
    """The ledger's lines up to and including the entry of ``round_number``."""
    lines = ledger.read_text().splitlines(keepends=True)
    end = next(i for i, line in enumerate(lines)
               if "kind" not in json.loads(line) and json.loads(line)["round"] == round_number)
    return lines[: end + 1]


@pytest.mark.slow
def test_missing_ledger_entries_and_torn_lines_are_reported(simulation, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(simulation[0] / "federated", copy, ignore=shutil.ignore_patterns("report", ".flwr"))
    site2 = copy / "sites" / "site-2" / "ledger.jsonl"
    site2.write_text("".join(_up_to_round(site2, 1)))  # round 2 lost
    site3 = copy / "sites" / "site-3" / "ledger.jsonl"
    site3.write_text("".join(_up_to_round(site3, 2))[:-30])  # round 2's line cut short
    done = subprocess.run([str(BIN / "fedmed-report"), str(copy)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads((copy / "report" / "privacy-report.json").read_text())
    found = {(w["code"], w["site"]) for w in report["warnings"]}
    assert ("ledger-missing-round", "site-2") in found and ("ledger-torn-line", "site-3") in found
    assert ("ledger-missing-round", "site-3") in found, "the torn round is missing too"
    assert "CRITICAL [ledger-missing-round] site-2" in done.stdout
    strict = subprocess.run([str(BIN / "fedmed-report"), str(copy), "--format", "json", "--fail-on-critical"],
                            capture_output=True, text=True)
    assert strict.returncode == 3, "automated checks can fail on a critical finding"


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium package (/usr/bin/chromium); "
                    ".ci/run installs it")
def test_chromium_shows_the_plots_and_the_budget_table(simulation, tmp_path):
    page = simulation[0] / "federated" / "report" / "privacy-report.html"
    ARTEFACTS.mkdir(exist_ok=True)
    screenshot = ARTEFACTS / "privacy-report.png"
    screenshot.unlink(missing_ok=True)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2200", "--hide-scrollbars"]
    subprocess.run([str(CHROMIUM), *flags, f"--screenshot={screenshot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    dom = subprocess.run([str(CHROMIUM), *flags, "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "Privacy budget per site" in dom and dom.count("<img") == 3
    image = Image.open(screenshot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None

    def pixels_near(rgb: tuple[int, int, int]) -> int:
        return sum(n for n, c in colours if all(abs(a - b) <= 12 for a, b in zip(c, rgb)))

    assert pixels_near((31, 119, 180)) > 200, "matplotlib's first line colour: the plots were drawn"
    assert pixels_near((44, 160, 44)) > 200, "the sites-per-round bars were drawn"
    assert pixels_near((0xEE, 0xF1, 0xF5)) > 2000, "the budget table's header row was drawn"
