"""Cumulative epsilon, noise calibration and delta checks."""

import pytest

from fedmed.privacy.accounting import (
    calibrate_noise,
    check_delta,
    default_delta,
    epsilon,
    extend,
    round_plan,
)
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from tests.privacy_helpers import independent_epsilon, independent_rdp_epsilon, run_rounds


def test_ledger_epsilon_matches_an_independent_accountant_after_each_round(tmp_path):
    results = run_rounds(tmp_path / "ledger.jsonl", 3, PrivacyConfig(target_epsilon=4.0, planned_rounds=3))
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    assert [e.round for e in ledger.entries] == [1, 2, 3]
    for result, entry in zip(results, ledger.entries):
        assert entry.epsilon == pytest.approx(result.epsilon)
        second_opinion = independent_epsilon(entry.accountant_state, entry.delta)
        assert entry.epsilon == pytest.approx(second_opinion, rel=0.01)
    epsilons = [e.epsilon for e in ledger.entries]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0


@pytest.mark.parametrize(
    "target, examples, batch, epochs, rounds",
    [(1.0, 5000, 64, 1, 10), (3.0, 1200, 32, 2, 5), (8.0, 4708, 256, 1, 20), (8.0, 300, 16, 1, 3)],
)
def test_calibrated_noise_lands_the_planned_rounds_just_under_the_target(target, examples, batch, epochs, rounds):
    delta = default_delta(examples)
    rate, steps = round_plan(examples, batch, epochs)
    sigma = calibrate_noise(target, delta, rate, steps * rounds)
    history = []
    for _ in range(rounds):
        history = extend(history, sigma, rate, steps)
    spent = epsilon(history, delta)
    assert 0.95 * target <= spent <= target
    assert spent == pytest.approx(independent_epsilon(history, delta), rel=0.01)


def test_calibration_counts_what_the_site_already_spent():
    rate, steps = round_plan(1000, 50, 1)
    fresh = calibrate_noise(4.0, 1e-5, rate, steps * 5)
    spent = extend([], fresh, rate, steps * 3)
    after_spending = calibrate_noise(4.0, 1e-5, rate, steps * 5, spent=spent)
    assert after_spending > fresh
    assert 0.95 * 4.0 <= epsilon(extend(spent, after_spending, rate, steps * 5), 1e-5) <= 4.0
    with pytest.raises(ValueError, match="already spent"):
        calibrate_noise(0.5, 1e-5, rate, steps, spent=extend([], 0.5, rate, 100))


def test_default_delta_is_well_below_one_over_n():
    for n in (10, 999, 1000, 4708, 10**6):
        assert default_delta(n) <= 0.1 / n
        check_delta(default_delta(n), n)


@pytest.mark.parametrize("delta", [1 / 500, 0.01, 0.0])
def test_delta_of_one_over_n_or_more_is_rejected_with_advice(delta):
    with pytest.raises(ValueError, match=r"must be positive and below 1/n = 0\.002.*n=500.*use e\.g\. delta=1e-05"):
        check_delta(delta, 500)


def test_site_with_too_large_delta_refuses_to_train(tmp_path):
    with pytest.raises(ValueError, match="below 1/n"):
        run_rounds(tmp_path / "ledger.jsonl", 1, PrivacyConfig(delta=0.05), n=64)
    assert not (tmp_path / "ledger.jsonl").exists()


def test_the_ledgers_accountant_is_dp_accountings_pld_accountant():
    """Grouping a history by mechanism (composition does not depend on order) gives what
    dp-accounting's own PLDAccountant gives composing the events one by one."""
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from fedmed.privacy.pld import DISCRETISATION

    history = [(1.1, 0.05, 40), (3.0, 1.0, 1), (0.9, 0.08, 25), (3.0, 1.0, 1), (1.1, 0.05, 10)]
    accountant = PLDAccountant(value_discretization_interval=DISCRETISATION)
    for sigma, rate, steps in history:
        accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    assert epsilon(history, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-6)


def test_the_reports_second_opinion_is_rdp_and_looser_than_the_ledger():
    from fedmed.privacy.second_opinion import SECOND_OPINION, second_opinion_epsilon

    history = [(1.1, 0.05, 40), (3.0, 1.0, 1), (0.9, 0.08, 25), (3.0, 1.0, 1), (1.1, 0.05, 10)]
    assert SECOND_OPINION == "rdp"
    assert second_opinion_epsilon(history, 1e-5) == pytest.approx(independent_rdp_epsilon(history, 1e-5), rel=0.01)
    assert epsilon(history, 1e-5) < second_opinion_epsilon(history, 1e-5)
