"""Robust aggregation: a hostile site's update or weight moves the global model by at
most the stated bound, and median and trimmed mean ignore one outlier of five."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmed.config import RunSettings
from fedmed.coordinator.aggregation import (
    apply_move,
    bound_updates,
    combine,
    honest_norm_bound,
    momentum_sums,
    round_norm_bound,
    trimmed_count,
)
from fedmed.coordinator.fedavg import SiteUpdate, weighted_average
from fedmed.flower.coordinator import FederatedRun
from fedmed.flower.packing import vector_to_record
from fedmed.flower.rounds import PlainRound
from fedmed.vector import pack
from tests.test_coordinator import _reply, task_identity  # noqa: F401 - the fixture sets Flower's ids

CURRENT = {"w": np.zeros(40, dtype=np.float32), "b": np.zeros(2, dtype=np.float32)}


def _honest(count: int, seed: int = 0) -> list[SiteUpdate]:
    rng = np.random.default_rng(seed)
    return [SiteUpdate(f"site-{i}", int(rng.integers(100, 400)),
                       {k: (a + rng.normal(0.0, 0.05, a.shape)).astype(np.float32) for k, a in CURRENT.items()})
            for i in range(count)]


def _scaled(update: SiteUpdate, factor: float, name: str = "hostile") -> SiteUpdate:
    return SiteUpdate(name, update.examples, {k: a * factor for k, a in update.state.items()})


def _move(state: dict[str, np.ndarray]) -> np.ndarray:
    return pack(state).astype(np.float64) - pack(CURRENT).astype(np.float64)


def test_a_scaled_up_update_moves_the_mean_by_at_most_its_share_of_the_bound():
    honest = _honest(4)
    hostile = _scaled(_honest(1, seed=9)[0], 1000.0)
    bound = 1.0
    bounded = bound_updates([*honest, hostile], CURRENT, bound, max_examples=0)
    aggregate = combine(bounded, "mean", 0.0)
    without = weighted_average(honest)
    share = bounded.weights["hostile"] / sum(bounded.weights.values())
    # the hostile site's pull on the mean: its weight share of (its bounded move - the others' mean)
    shift = np.linalg.norm(aggregate - _move(without) * (1 - share))
    assert shift <= share * bound + 1e-9
    assert np.linalg.norm(aggregate) <= bound + 1e-9
    assert "above the bound" in bounded.clipped["hostile"] and set(bounded.clipped) == {"hostile"}
    unbounded = combine(bound_updates([*honest, hostile], CURRENT, math.inf, 0), "mean", 0.0)
    assert np.linalg.norm(unbounded) > 20 * bound  # what the bound prevented


def test_a_huge_claimed_record_count_is_capped():
    honest = _honest(4)
    hostile = SiteUpdate("hostile", 10**9, {k: a + 1.0 for k, a in CURRENT.items()})
    median_claim = float(np.median([u.examples for u in [*honest, hostile]]))
    default = bound_updates([*honest, hostile], CURRENT, math.inf, max_examples=0)
    assert default.weights["hostile"] == 10 * median_claim
    assert "claimed 1000000000 records" in default.clipped["hostile"]
    declared = bound_updates([*honest, hostile], CURRENT, math.inf, max_examples=500)
    assert declared.weights["hostile"] == 500
    share = 500 / (500 + sum(u.examples for u in honest))
    aggregate = combine(declared, "mean", 0.0)
    honest_mean = combine(bound_updates(honest, CURRENT, math.inf, 0), "mean", 0.0)
    # with the cap the hostile site's pull is its capped share of its move; uncapped it would own the mean
    np.testing.assert_allclose(aggregate, (1 - share) * honest_mean + share * 1.0, atol=1e-6)
    assert np.abs(combine(bound_updates([*honest, hostile], CURRENT, math.inf, 10**10), "mean", 0.0) - 1.0).max() < 1e-5


@pytest.mark.parametrize("rule", ["median", "trimmed-mean"])
def test_median_and_trimmed_mean_ignore_one_outlier_of_five(rule):
    honest = _honest(4)
    outlier = _scaled(honest[0], 500.0, "outlier")
    bounded = bound_updates([*honest, outlier], CURRENT, math.inf, 0)
    aggregate = combine(bounded, rule, trim_fraction=0.2)
    moves = np.stack([_move(u.state) for u in honest])
    assert np.all(aggregate >= moves.min(axis=0) - 1e-9) and np.all(aggregate <= moves.max(axis=0) + 1e-9)
    mean = combine(bounded, "mean", 0.0)
    assert np.abs(mean).max() > 5 * np.abs(moves).max()  # the plain mean is steered by the outlier


def test_trimmed_mean_drops_at_least_one_and_never_everything():
    assert [trimmed_count(n, 0.2) for n in (1, 2, 3, 5, 10, 11)] == [0, 0, 1, 1, 2, 2]
    assert trimmed_count(5, 0.0) == 0


def test_the_honest_bound_covers_an_honest_noisy_momentum_update():
    """An honest site's move under the bound's own model of DP-SGD: momentum over steps of
    a clipped gradient plus Gaussian noise. The derived bound must not clip it, and must be
    far below a scaled-up update."""
    run = RunSettings(local_steps=5, batch_size=64, learning_rate=0.5, momentum=0.9, max_grad_norm=1.0)
    parameters, sigma, rng = 20_000, 1.1, np.random.default_rng(0)
    direction = rng.normal(size=parameters)
    direction /= np.linalg.norm(direction)
    norms = []
    for _ in range(20):
        velocity, move = np.zeros(parameters), np.zeros(parameters)
        for _ in range(run.local_steps):
            gradient = direction + rng.normal(0.0, sigma * run.max_grad_norm / run.batch_size, parameters)
            velocity = run.momentum * velocity + gradient
            move -= run.learning_rate * velocity
        norms.append(np.linalg.norm(move))
    bound = honest_norm_bound(run, 1, steps=5, noise_multiplier=sigma, trained_parameters=parameters, model_norm=0.0)
    assert max(norms) <= bound < 1.5 * max(norms)
    np.testing.assert_allclose(momentum_sums(3, 0.5), [1.75, 1.5, 1.0])


def test_the_round_bound_follows_the_honest_majority_and_skips_non_private_rounds():
    run = RunSettings(local_steps=5)
    honest = {"dp": 1, "steps": 5, "noise-multiplier": 1.0}
    liar = {"dp": 1, "steps": 5, "noise-multiplier": 1000.0}
    noisier = {"dp": 1, "steps": 5, "noise-multiplier": 1.7}  # a smaller site, or a tighter budget
    expected = honest_norm_bound(run, 1, steps=5, noise_multiplier=1.7, trained_parameters=1000, model_norm=0.0)
    assert round_norm_bound(run, 1, [honest, noisier, honest, liar], 1000, 0.0) == expected
    assert round_norm_bound(run, 1, [honest, liar], 1000, 0.0) == honest_norm_bound(
        run, 1, steps=5, noise_multiplier=1.0, trained_parameters=1000, model_norm=0.0)
    assert round_norm_bound(run, 1, [{"dp": 0, "steps": 5}] * 3, 1000, 0.0) == math.inf
    fixed = RunSettings(max_update_norm=2.5)
    assert round_norm_bound(fixed, 1, [liar], 1000, 0.0) == 2.5


def test_the_coordinator_records_each_bounded_update_with_its_reason(tmp_path):
    settings = RunSettings(run_dir=str(tmp_path), width=8, image_size=16, max_update_norm=0.5,
                           max_site_examples=1000)
    run = FederatedRun(grid=None, run=settings)
    vector = pack(run.reference)
    replies = [_reply(run, 1, "honest-a", vector_to_record(vector + 1e-4)),
               _reply(run, 2, "honest-b", vector_to_record(vector - 1e-4)),
               _reply(run, 3, "scaled", vector_to_record(vector + 1.0)),
               _reply(run, 4, "heavy", vector_to_record(vector + 1e-4), examples=10**9)]
    outcome = run.collect(1, {r.metadata.src_node_id: r for r in replies}, missing=[])
    state = PlainRound.aggregate(run, 1, run.reference, outcome)
    assert set(outcome.clipped) == {"scaled", "heavy"}
    assert "scaled down" in outcome.clipped["scaled"] and "cap of 1000" in outcome.clipped["heavy"]
    moved = pack(state).astype(np.float64) - vector
    assert np.linalg.norm(moved) <= 0.5 + 1e-5
    run.recorder.round(1, outcome, True, 0.1)
    record = [r for r in run.run_dir.metrics() if r.get("event") == "round"][-1]
    assert record["clipped"] == outcome.clipped and record["norm_bound"] == 0.5
    np.testing.assert_allclose(pack(apply_move(run.reference, moved)), pack(state), atol=1e-6)


def test_secure_aggregation_refuses_a_rule_it_cannot_compute():
    with pytest.raises(ValueError, match="can only take their mean"):
        RunSettings(secure_aggregation=True, aggregation="median")


def test_the_run_report_lists_each_bounded_update_and_a_failed_secure_round(tmp_path):
    from fedmed.report.run import run_view

    settings = RunSettings(run_dir=str(tmp_path), width=8, image_size=16, max_update_norm=0.5)
    run = FederatedRun(grid=None, run=settings)
    run.run_dir.write_config(settings.to_flower())
    vector = pack(run.reference)
    replies = [_reply(run, 1, "honest", vector_to_record(vector + 1e-4)),
               _reply(run, 2, "scaled", vector_to_record(vector + 1.0))]
    outcome = run.collect(1, {r.metadata.src_node_id: r for r in replies}, missing=[])
    PlainRound.aggregate(run, 1, run.reference, outcome)
    run.recorder.round(1, outcome, True, 0.1)
    failed = type(outcome)(secure={"threshold": 3, "failed": "2 of 4 sites sent masked updates"})
    run.recorder.round(2, failed, False, 0.1)
    view, findings = run_view(tmp_path)
    assert view["rounds"][0]["bounded"] == {"scaled": outcome.clipped["scaled"]}
    codes = {f.code: f.message for f in findings}
    assert "round 1: scaled: update norm" in codes["updates-bounded"]
    assert codes["secure-aggregation-failed"] == "round 2: 2 of 4 sites sent masked updates"
