"""The run directory's round and validation records (fedmed.records): a line written by
fedmed before the records were typed, or by an older coordinator still, reads back with its
values, and a record writes the same JSON it was read from."""

from __future__ import annotations

import copy
import json
import math

import pytest

from fedmed import protocol
from fedmed.config import RunSettings
from fedmed.coordinator.fedavg import SiteUpdate
from fedmed.coordinator.outcome import RoundOutcome
from fedmed.coordinator.recorder import RunRecorder
from fedmed.coordinator.results import round_rows
from fedmed.deploy.progress import round_line
from fedmed.records import RoundRecord, ValidationRecord, read_record
from fedmed.report.site import SiteAccount
from fedmed.rundir import RunDirectory

TRAINED = {"status": 0, "dp": 1, "steps": 12, "epsilon": 1.9, "delta": 1e-05, "noise-multiplier": 1.1,
           "privacy-unit": 0, "examples": 200, "loss": 0.5, "seconds-setup": 0.5, "seconds-train": 8.25}
REFUSED = {"status": 1, "dp": 1, "steps": 0, "epsilon": 7.9, "delta": 1e-05, "noise-multiplier": 1.1,
           "privacy-unit": 1}
HELD_OUT = {"auroc": 0.81, "accuracy": 0.75, "balanced_accuracy": 0.74, "loss": 0.52, "sensitivity": 0.7,
            "specificity": 0.78, "examples": 120}

# A round record as fedmed wrote it before the records were typed: the dict literal of
# `RunRecorder.round` (git show 64c62d9:fedmed/coordinator/recorder.py), key for key in its
# order, with the values that round produced.
ROUND = {
    "event": "round", "round": 3, "rounds": 10,
    "seconds": 12.5, "aggregated": True, "min_sites": 2,
    "trained": ["site-1", "site-2"], "budget_exhausted": ["site-3"],
    "rejected": {"site-4": "metrics outside the whitelist: x"},
    "clipped": {"site-2": "update norm 3.2 scaled down to the bound 1.5"},
    "norm_bound": 1.5,
    "aggregation": "mean", "secure_aggregation": None,
    "failed": {"site-5": "RuntimeError: out of memory"}, "missing": ["site-6"],
    "examples": 350.0, "train_loss": 0.5,
    "slowest_site_train_seconds": 8.25,
    "sites": {"site-1": {**TRAINED, "status_name": "trained"},
              "site-2": {**TRAINED, "examples": 150, "seconds-train": 6.0, "status_name": "trained"},
              "site-3": {**REFUSED, "status_name": "budget_exhausted"}},
    "reply_seconds": {"site-1": 9.0, "site-2": 7.5, "site-3": 0.25},
    "server_validation": HELD_OUT,
}
# The same literal for a round below min_sites, under secure aggregation, with no held-out set.
UNCHANGED = {
    "event": "round", "round": 4, "rounds": 10,
    "seconds": 3.0, "aggregated": False, "min_sites": 2,
    "trained": ["site-1"], "budget_exhausted": [],
    "rejected": {}, "clipped": {},
    "norm_bound": None,
    "aggregation": "mean", "secure_aggregation": {"threshold": 2, "failed": "1 of 3 sites sent masked updates"},
    "failed": {}, "missing": ["site-2", "site-3"],
    "examples": 0.0, "train_loss": math.nan,
    "slowest_site_train_seconds": 0.0,
    "sites": {"site-1": {"status": 0, "dp": 1, "steps": 12, "epsilon": 2.5, "delta": 1e-05,
                         "noise-multiplier": 1.1, "privacy-unit": 0, "status_name": "trained"}},
    "reply_seconds": {"site-1": 2.0},
    "note": "only 1 valid updates, below the minimum of 2 sites: global model unchanged this round",
}
# A round record of the first federated fedmed (70cef6c): no bound, rule, secure
# aggregation or reply times yet.
OLDER_ROUND = {
    "event": "round", "round": 2, "rounds": 5, "seconds": 20.0, "aggregated": True, "min_sites": 2,
    "trained": ["a", "b"], "budget_exhausted": [], "rejected": {}, "failed": {"c": "timeout"}, "missing": [],
    "examples": 300, "train_loss": 0.7, "slowest_site_train_seconds": 0.0,
    "sites": {"a": {"status": 0, "dp": 1, "epsilon": 1.0, "status_name": "trained"},
              "b": {"status": 0, "dp": 1, "epsilon": 1.2, "status_name": "trained"}},
}
# The validation literal of `RunRecorder.validation`, and one from before the error bars.
VALIDATION = {
    "event": "validation", "round": 3,
    "sites": {"site-1": {"val-examples": 41.5, "val-auroc": 0.8, "val-accuracy": 0.7},
              "site-2": {"val-examples": 20.25, "val-auroc": 0.6, "val-accuracy": 0.65}},
    "weighted": {"val-examples": 61.75, "val-auroc": 0.77, "val-accuracy": 0.69},
    "errors": {"sites": {"site-1": {"val-auroc-se": 0.05, "val-examples-se": 3.0},
                         "site-2": {"val-auroc-se": 0.09, "val-examples-se": 3.0}},
               "weighted": {"val-auroc-se": 0.04, "val-examples-se": 4.25}},
}
OLDER_VALIDATION = {"event": "validation", "round": 1, "sites": {"a": {"val-examples": 10.0, "val-auroc": 0.9}},
                    "weighted": {"val-examples": 10.0, "val-auroc": 0.9}}


def _same_json(a: dict, b: dict) -> bool:
    """Equal as fedmed writes them (NaN == NaN), keys in the same order."""
    return json.dumps(a) == json.dumps(b)


@pytest.mark.parametrize("line", [ROUND, UNCHANGED], ids=["aggregated", "unchanged"])
def test_a_round_record_writes_the_json_it_was_read_from(line):
    record = RoundRecord.from_json(copy.deepcopy(line))
    assert _same_json(record.to_json(), line)
    assert list(record.to_json()) == list(line), "the same keys in the same order"


def test_a_round_record_reads_back_with_its_values():
    record = RoundRecord.from_json(ROUND)
    assert (record.round, record.rounds, record.seconds, record.aggregated, record.min_sites) == (3, 10, 12.5, True, 2)
    assert record.trained == ["site-1", "site-2"] and record.budget_exhausted == ["site-3"]
    assert record.rejected == {"site-4": "metrics outside the whitelist: x"}
    assert record.clipped == {"site-2": "update norm 3.2 scaled down to the bound 1.5"} and record.norm_bound == 1.5
    assert record.aggregation == "mean" and record.secure_aggregation is None
    assert record.failed == {"site-5": "RuntimeError: out of memory"} and record.missing == ["site-6"]
    assert (record.examples, record.train_loss, record.slowest_site_train_seconds) == (350.0, 0.5, 8.25)
    assert record.sites["site-2"]["examples"] == 150 and record.sites["site-3"]["status_name"] == "budget_exhausted"
    assert record.sites["site-1"]["noise-multiplier"] == 1.1
    assert record.reply_seconds == {"site-1": 9.0, "site-2": 7.5, "site-3": 0.25}
    assert record.server_validation == HELD_OUT and record.note is None
    unchanged = RoundRecord.from_json(UNCHANGED)
    assert not unchanged.aggregated and unchanged.norm_bound is None and math.isnan(unchanged.train_loss)
    assert unchanged.secure_aggregation == {"threshold": 2, "failed": "1 of 3 sites sent masked updates"}
    assert unchanged.server_validation is None and unchanged.note.startswith("only 1 valid updates")


def test_an_older_round_record_reads_with_what_its_readers_assumed_for_the_newer_keys():
    record = RoundRecord.from_json(OLDER_ROUND)
    assert (record.round, record.rounds, record.examples, record.train_loss) == (2, 5, 300, 0.7)
    assert record.trained == ["a", "b"] and record.failed == {"c": "timeout"}
    assert record.sites["b"]["epsilon"] == 1.2
    assert record.clipped == {} and record.norm_bound is None and record.aggregation is None
    assert record.secure_aggregation is None and record.reply_seconds == {}
    assert record.server_validation is None and record.note is None
    oldest = RoundRecord.from_json({"event": "round", "round": 7})
    assert (oldest.trained, oldest.rejected, oldest.aggregated, oldest.sites) == ([], {}, False, {})
    with pytest.raises(KeyError):
        RoundRecord.from_json({"event": "round", "rounds": 3})


def test_a_validation_record_reads_back_and_writes_the_same_json():
    record = ValidationRecord.from_json(VALIDATION)
    assert record.round == 3 and record.sites["site-2"]["val-auroc"] == 0.6
    assert record.weighted == {"val-examples": 61.75, "val-auroc": 0.77, "val-accuracy": 0.69}
    assert record.site_errors["site-1"] == {"val-auroc-se": 0.05, "val-examples-se": 3.0}
    assert record.weighted_errors == {"val-auroc-se": 0.04, "val-examples-se": 4.25}
    assert _same_json(record.to_json(), VALIDATION)
    older = ValidationRecord.from_json(OLDER_VALIDATION)
    assert older.round == 1 and older.weighted["val-auroc"] == 0.9 and older.sites["a"]["val-examples"] == 10.0
    assert older.site_errors == {} and older.weighted_errors == {}


def test_unknown_keys_are_ignored_and_other_lines_are_no_records():
    record = RoundRecord.from_json({**ROUND, "written_by": "a later fedmed"})
    assert _same_json(record.to_json(), ROUND)
    assert ValidationRecord.from_json({**VALIDATION, "extra": 1}) == ValidationRecord.from_json(VALIDATION)
    assert read_record(ROUND) == RoundRecord.from_json(ROUND)
    assert read_record(VALIDATION) == ValidationRecord.from_json(VALIDATION)
    assert read_record({"event": "status", "round": 1}) is None
    assert read_record({"event": "round"}) is None and read_record([1, 2]) is None


def test_the_recorder_writes_the_round_and_validation_lines_fedmed_always_wrote(tmp_path):
    run_dir = RunDirectory(tmp_path)
    recorder = RunRecorder(RunSettings(rounds=10, min_sites=2, aggregation="mean"), run_dir)
    site_2 = TRAINED | {"examples": 150, "seconds-train": 6.0, "val-examples": 20.25}  # val-*: validation's
    outcome = RoundOutcome(
        updates=[SiteUpdate("site-1", 200, {}), SiteUpdate("site-2", 150, {})], budget_exhausted=["site-3"],
        rejected={"site-4": "metrics outside the whitelist: x"}, failed={"site-5": "RuntimeError: out of memory"},
        missing=["site-6"], trained=["site-1", "site-2"], examples=350.0,
        clipped={"site-2": "update norm 3.2 scaled down to the bound 1.5"}, norm_bound=1.5,
        site_metrics={"site-1": TRAINED, "site-2": site_2, "site-3": REFUSED},
        reply_seconds={"site-1": 9.0, "site-2": 7.5, "site-3": 0.25})
    recorder.round(3, outcome, True, 12.5, held_out=HELD_OUT)
    unchanged = RoundOutcome(trained=["site-1"], missing=["site-2", "site-3"],
                             secure={"threshold": 2, "failed": "1 of 3 sites sent masked updates"},
                             site_metrics={"site-1": {k: v for k, v in UNCHANGED["sites"]["site-1"].items()
                                                      if k != "status_name"}},
                             reply_seconds={"site-1": 2.0})
    recorder.round(4, unchanged, False, 3.0)
    recorder.close()
    lines = run_dir.metrics_path.read_text().splitlines()
    assert lines[0] == json.dumps(ROUND, sort_keys=True)
    assert lines[1] == json.dumps(UNCHANGED, sort_keys=True)
    assert [r.to_json() for r in run_dir.rounds()][0] == ROUND


def test_the_run_directory_reads_its_records_in_order(tmp_path):
    run_dir = RunDirectory(tmp_path)
    for line in (OLDER_VALIDATION, OLDER_ROUND, {"event": "note", "round": 2}, {"event": "round"}, VALIDATION,
                 ROUND, UNCHANGED):
        run_dir.append_metrics(line)
    with open(run_dir.metrics_path, "a") as handle:
        handle.write('{"event": "round", "round": 5, "se')  # cut short by a crash
    assert [type(r).__name__ for r in run_dir.records()] == ["ValidationRecord", "RoundRecord", "ValidationRecord",
                                                            "RoundRecord", "RoundRecord"]
    assert [r.round for r in run_dir.rounds()] == [2, 3, 4] and [r.round for r in run_dir.validations()] == [1, 3]
    assert run_dir.rounds()[1] == RoundRecord.from_json(ROUND)
    assert len(run_dir.metrics()) == 7, "every whole line, as written"


def test_the_readers_show_older_and_current_records_as_before(tmp_path):
    """metrics.csv's rows and the progress line, as the dict readers showed them."""
    records = [RoundRecord.from_json(OLDER_ROUND), ValidationRecord.from_json(VALIDATION),
               RoundRecord.from_json(ROUND), RoundRecord.from_json(UNCHANGED)]
    rows = round_rows(records)
    assert [r["round"] for r in rows] == [2, 3, 4]
    assert rows[0] == {"round": 2, "aggregated": 1, "examples": 300, "train_loss": 0.7, "seconds": 20.0,
                       "trained": 2, "budget_exhausted": 0, "rejected": 0, "failed": 1, "missing": 0,
                       **{f"held_out_{s}": None for s in ("auroc", "balanced_accuracy", "sensitivity",
                                                          "specificity", "accuracy", "loss")},
                       **{f"sites_val_{s}": None for s in ("auroc", "balanced_accuracy", "sensitivity",
                                                           "specificity", "accuracy", "loss")},
                       "sites_val_examples": None}
    assert (rows[1]["held_out_auroc"], rows[1]["sites_val_auroc"], rows[1]["sites_val_examples"]) == (0.81, 0.77, 61.75)
    assert (rows[2]["aggregated"], rows[2]["missing"]) == (0, 2)
    assert round_line(records[2]) == ("round 3/10: 2 sites trained; budget exhausted: site-3; missing: site-6; "
                                      "rejected: site-4; failed: site-5; held-out AUROC 0.810")
    assert round_line(records[3]) == ("round 4/10: 1 sites trained; missing: site-2, site-3; "
                                      "model unchanged (below --min-sites)")
    assert round_line(records[0]) == "round 2/5: 2 sites trained; failed: c"


def test_the_reply_metrics_type_names_the_whitelist():
    assert set(protocol.ReplyMetrics.__annotations__) == protocol.REPLY_METRICS
    assert protocol.ReplyMetrics.__required_keys__ == frozenset(), "every key may be absent from a reply"


def test_a_site_account_writes_the_json_it_was_read_from():
    account = {"site": "site-1", "ledger": "/l/ledger.jsonl", "ledger_lines": 3,
               "ledger_chain": {"status": "chained", "chained_lines": 3, "unchained_lines": 0, "first_bad_line": None},
               "accountant": "rdp", "second_opinion_accountant": "pld", "delta": 1e-05, "budget": 8.0,
               "target_epsilon": 6.0, "epsilon_spent": 2.5, "epsilon_second_opinion": 2.25, "non_private_rounds": 0,
               "budget_left": 5.5, "budget_used": 0.3125, "runs": [{"run_id": "r"}], "rounds": [{"round": 1}],
               "releases": [], "refused": [], "unreadable_lines": []}
    read = SiteAccount.from_json(account)
    assert (read.site, read.budget, read.epsilon_spent, read.budget_used) == ("site-1", 8.0, 2.5, 0.3125)
    assert read.to_json() == account and list(read.to_json()) == list(account)
