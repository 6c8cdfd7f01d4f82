"""Local training on real chest X-rays, metrics, and the weights that leave a site."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from fedmed.data.npz import load_npz
from fedmed.metrics import auroc, classification_metrics
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.protocol import RoundStatus
from fedmed.train import TrainConfig, TrainingData, evaluate, train_round
from fedmed.weights import InvalidWeights, check_state, load_state, model_state
from tests.conftest import auroc as brute_force_auroc


@pytest.mark.slow
def test_a_few_dp_rounds_on_real_chest_xrays_learn(pneumonia_npz, tmp_path):
    train = load_npz(pneumonia_npz, "train")
    test = load_npz(pneumonia_npz, "test")
    pick = np.random.default_rng(0).permutation(len(train.labels))[:1200]
    images, labels = train.images[pick].astype(np.float32) / 255, train.labels[pick]
    test_images = test.images.astype(np.float32) / 255
    torch.manual_seed(0)
    model = build_model(ModelConfig(width=16, image_size=28))
    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    before = evaluate(model, test_images, test.labels)
    # A fixed noise seed keeps this check from depending on one lucky or unlucky draw.
    config = TrainConfig(batch_size=128, learning_rate=0.3, class_weights=(2.0, 0.7), insecure_noise_seed=0)
    privacy = PrivacyConfig(target_epsilon=8.0, planned_rounds=3)
    results = [train_round(model, TrainingData(images, labels), train=config, privacy=privacy, ledger=ledger,
                           site="site-1", run_id="run", round_number=r) for r in (1, 2, 3)]
    after = evaluate(model, test_images, test.labels)
    assert all(r.status == RoundStatus.TRAINED and r.dp for r in results)
    assert results[-1].loss < results[0].loss, "the training loss falls round by round"
    assert after["auroc"] > 0.7 and after["auroc"] > before["auroc"] + 0.1
    assert results[-1].epsilon <= 8.0 and len(ledger.entries) == 3


def test_metrics_on_an_unbalanced_set():
    labels = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    probabilities = np.zeros((10, 2))
    probabilities[:, 1] = [0.1, 0.2, 0.3, 0.1, 0.6, 0.2, 0.1, 0.3, 0.9, 0.4]
    probabilities[:, 0] = 1 - probabilities[:, 1]
    metrics = classification_metrics(labels, probabilities)
    assert metrics["confusion_matrix"] == [[7, 1], [1, 1]]
    assert metrics["accuracy"] == pytest.approx(0.8)
    assert metrics["sensitivity"] == pytest.approx(0.5)
    assert metrics["specificity"] == pytest.approx(7 / 8)
    assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 7 / 8) / 2)
    assert metrics["auroc"] == pytest.approx(brute_force_auroc(probabilities[:, 1], labels))


def test_auroc_with_ties_matches_pair_counting():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 200).astype(float)
    labels = rng.integers(0, 2, 200)
    assert auroc(scores, labels == 1) == pytest.approx(brute_force_auroc(scores, labels))
    assert np.isnan(auroc(scores, np.zeros(200, dtype=bool)))


def test_weights_leave_as_plain_named_arrays_and_load_into_a_fresh_model():
    config = ModelConfig(width=8, image_size=16)
    trained = build_model(config)
    wrapped = GradSampleModule(trained)
    assert any(k.startswith("_module.") for k in wrapped.state_dict())
    state = model_state(wrapped)
    wrapped._close()
    assert not any(k.startswith("_module.") for k in state)
    assert set(state) == set(build_model(config).state_dict())
    fresh = build_model(config)
    load_state(fresh, state)
    x = torch.rand(2, 1, 16, 16)
    trained.eval(), fresh.eval()
    torch.testing.assert_close(fresh(x), trained(x))


def test_bad_incoming_states_are_refused_with_every_problem_named():
    model = build_model(ModelConfig(width=8, image_size=16))
    good = model_state(model)
    bad = dict(good)
    bad["fc.weight"] = np.full_like(good["fc.weight"], np.nan)
    bad["conv1.weight"] = np.zeros((3, 3), dtype=np.float32)
    bad["layer1.0.bn1.bias"] = good["layer1.0.bn1.bias"].astype(np.float64)
    del bad["fc.bias"]
    bad["extra"] = np.zeros(1, dtype=np.float32)
    problems = check_state(bad, good)
    joined = "; ".join(problems)
    for fragment in ("missing arrays: fc.bias", "unexpected arrays: extra", "conv1.weight: shape (3, 3)",
                     "layer1.0.bn1.bias: dtype float64", f"fc.weight: {good['fc.weight'].size} non-finite values"):
        assert fragment in joined
    with pytest.raises(InvalidWeights):
        load_state(model, bad)
    assert check_state(good, good) == []


def test_dp_noise_is_added_at_the_configured_scale(tmp_path):
    """With every example in the batch (sample rate 1), one private step moves each weight by
    -lr * (sum of clipped gradients + N(0, (sigma * C)^2)) / n: across repeated steps from the
    same model on the same batch, the spread is lr * sigma * C / n. Removing the noise makes
    the spread zero; noise at the wrong scale moves it away from the prediction."""
    rng = np.random.default_rng(0)
    n, learning_rate, clip = 32, 1.0, 0.5
    images = rng.random((n, 16, 16), dtype=np.float32)
    labels = rng.integers(0, 2, n)
    start = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
    initial = torch.cat([p.detach().flatten() for p in start.parameters()])
    steps, sigmas = [], set()
    for repeat in range(12):
        model = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
        config = TrainConfig(batch_size=n, steps=1, learning_rate=learning_rate, momentum=0.0,
                             insecure_noise_seed=repeat)
        privacy = PrivacyConfig(target_epsilon=4.0, max_grad_norm=clip)
        result = train_round(model, TrainingData(images, labels), train=config, privacy=privacy,
                             ledger=PrivacyLedger(tmp_path / f"{repeat}.jsonl"), site="site-1", run_id="run",
                             round_number=1)
        assert result.steps == 1 and result.dp
        sigmas.add(result.noise_multiplier)
        steps.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - initial)
    (sigma,) = sigmas
    spread = torch.stack(steps).var(dim=0).mean().sqrt().item()
    expected = learning_rate * sigma * clip / n
    assert spread == pytest.approx(expected, rel=0.05)


def test_a_non_private_step_is_no_longer_than_the_learning_rate_times_the_clip_norm(tmp_path):
    """Non-private rounds clip the batch gradient, so a step size tuned for DP-SGD cannot blow up."""
    rng = np.random.default_rng(0)
    images = rng.random((64, 16, 16), dtype=np.float32) * 50  # large inputs: large gradients
    labels = rng.integers(0, 2, 64)
    model = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    config = TrainConfig(batch_size=64, learning_rate=0.5, momentum=0.0, steps=1)
    privacy = PrivacyConfig(dp=False, max_grad_norm=0.1)
    result = train_round(model, TrainingData(images, labels), train=config, privacy=privacy,
                         ledger=PrivacyLedger(tmp_path / "l.jsonl"), site="s", run_id="r", round_number=1)
    moved = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    assert result.status == RoundStatus.TRAINED and not result.dp
    assert 0.0 < float(moved.norm()) <= 0.5 * 0.1 * (1 + 1e-5)
