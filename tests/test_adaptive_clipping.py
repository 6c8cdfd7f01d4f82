"""Adaptive clipping (training.clip_quantile): the clip norm finds its quantile, the gradient
and the count are one Gaussian mechanism of the ledger's noise multiplier, a run's clip norm
continues from its ledger, the report rechecks the split, and clip_quantile 0 changes nothing."""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm

import fedmed.train
from fedmed.config import RunSettings, SiteSettings
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.adaptive_clipping import AdaptiveClipping, count_noise, joint_noise, split_noise
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.clipping import PerSampleClipper
from fedmed.privacy.ledger import GENESIS, PrivacyLedger, line_hash
from fedmed.privacy.spending import SpendRequest, TrainedRound, spend_round
from fedmed.report import build_report
from fedmed.report.document import report_document
from fedmed.report.render import to_markdown
from fedmed.report.site import ledger_account
from fedmed.train import TrainConfig, TrainingData, train_round
from tests.privacy_helpers import tiny_site

SMALL_MODEL = ModelConfig(depth=10, width=8, image_size=16)


@pytest.fixture
def one_conv_route(monkeypatch):
    """Every clipper computes conv norms one way: the autotuner's timed choice may differ
    between two runs, and its routes agree only to rounding."""
    monkeypatch.setattr(fedmed.train, "PerSampleClipper", functools.partial(PerSampleClipper, conv_route="unfold"))


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_the_clip_norm_finds_its_quantile_from_ten_times_too_far(quantile):
    """Poisson samples of 64 expected records from lognormal norms, the count noise at m/20."""
    rng = np.random.default_rng(7)
    norms = rng.lognormal(0.0, 1.0, 20_000)
    target = float(np.quantile(norms, quantile))
    expected = 64.0
    clipping = AdaptiveClipping.for_round(
        1.0, expected, quantile=quantile, learning_rate=0.2, start=10 * target, ceiling=1e3
    )
    assert clipping.count_noise == expected / 20
    clip = clipping.start
    for _ in range(500):
        drawn = norms[rng.random(len(norms)) < expected / len(norms)]
        noise = rng.normal(0.0, clipping.count_noise)
        clip = clipping.step(clip, int((drawn <= clip).sum()), len(drawn), noise, expected)
    assert clip == pytest.approx(target, rel=0.15)


def test_the_clip_norm_never_passes_its_ceiling():
    clipping = AdaptiveClipping.for_round(1.0, 64.0, quantile=0.9, learning_rate=0.2, start=5.0, ceiling=1.0)
    assert clipping.start == 1.0, "a start above the ceiling is brought down to it"
    assert clipping.step(1.0, 0, 64, 0.0, 64.0) == 1.0, "every record clipped: it would grow, the ceiling holds"
    assert clipping.step(1.0, 64, 64, 0.0, 64.0) == pytest.approx(math.exp(-0.2 * 0.1))


def test_the_split_noise_is_one_gaussian_mechanism_of_the_ledgers_multiplier():
    for z_eff, m in [(1.0, 64.0), (0.7, 16.0), (5.0, 64.0), (1.3, 512.0)]:
        gradient, sigma_b = split_noise(z_eff, m)
        assert sigma_b == max(m / 20, z_eff) == count_noise(z_eff, m)
        assert z_eff < gradient <= z_eff * 2 / math.sqrt(3) * (1 + 1e-12)
        assert joint_noise(gradient, sigma_b) == pytest.approx(z_eff, rel=1e-12)
    gradient, sigma_b = split_noise(1.0, 64.0)
    assert (round(gradient, 4), sigma_b) == (1.0124, 3.2)
    # Brute force: the privacy loss of the pair (gradient sum with sensitivity C and noise
    # z_grad C, count with sensitivity 1/2 and noise sigma_b), sampled at one neighbour, is the
    # loss of one Gaussian mechanism of multiplier z_eff: N(mu^2/2, mu^2), mu = 1/z_eff.
    clip, rng = 0.7, np.random.default_rng(0)
    stds, shift = np.array([gradient * clip, sigma_b]), np.array([clip, 0.5])
    outputs = shift + rng.normal(size=(200_000, 2)) * stds
    loss = (norm.logpdf(outputs, shift, stds) - norm.logpdf(outputs, 0.0, stds)).sum(axis=1)
    mu = 1 / joint_noise(gradient, sigma_b)
    assert loss.mean() == pytest.approx(mu**2 / 2, rel=0.02)
    assert loss.std() == pytest.approx(mu, rel=0.01)


def test_an_adaptive_rounds_epsilon_is_the_pld_of_its_joint_mechanism(tmp_path):
    """The ledger's epsilon of an adaptive round against dp-accounting's PLD of the Gaussian
    mechanism of both queries, each scaled by its noise: noise 1, joint L2 sensitivity."""
    from dp_accounting.pld import privacy_loss_distribution

    ledger = PrivacyLedger(tmp_path / "ledger.jsonl")
    request = SpendRequest("site-a", "run", 1, records=1000, examples=1000, expected_batch=64.0, epochs=1, steps=0,
                           unit="image")
    privacy = PrivacyConfig(target_epsilon=1.0, clip_quantile=0.5)
    seen = []

    def train(plan, clipping):
        seen.append(clipping)
        return TrainedRound(0.5, clipping.start / 2)

    result = spend_round(ledger, privacy, request, train)
    [entry] = PrivacyLedger(tmp_path / "ledger.jsonl").entries
    [clipping] = seen
    assert (entry.gradient_noise_multiplier, entry.count_noise) == (clipping.gradient_noise, clipping.count_noise)
    assert entry.count_noise == pytest.approx(64 / 20) and entry.clip_quantile == 0.5
    assert result.noise_multiplier == entry.gradient_noise_multiplier > entry.noise_multiplier
    assert entry.accountant_state == [(entry.noise_multiplier, entry.sample_rate, entry.steps)]
    sensitivity = math.hypot(1 / entry.gradient_noise_multiplier, 1 / (2 * entry.count_noise))
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=1.0, sensitivity=sensitivity, sampling_prob=entry.sample_rate,
        value_discretization_interval=1e-3,
    ).self_compose(entry.steps)
    assert entry.epsilon == pytest.approx(pld.get_epsilon_for_delta(entry.delta), rel=0.01)


def _round(model, images, labels, ledger_path, privacy, round_number, run_id="adapt"):
    # a small step: the noise at a clip norm in the hundreds would throw the model far
    train = TrainConfig(batch_size=16, steps=6, learning_rate=1e-4, insecure_noise_seed=3)
    return train_round(model, TrainingData(images, labels), train=train, privacy=privacy,
                       ledger=PrivacyLedger(ledger_path), site="site-a", run_id=run_id, round_number=round_number)


def _edited(text: str, line: int, **changes) -> str:
    """The ledger ``text`` with fields of line ``line`` (0-based) changed, re-chained after it
    so only the change itself shows."""
    records = [json.loads(raw) for raw in text.splitlines()]
    records[line].update(changes)
    lines, previous = [], GENESIS
    for record in records:
        record["previous"] = previous
        lines.append(json.dumps(record, sort_keys=True, allow_nan=False))
        previous = line_hash(lines[-1])
    return "".join(f"{raw}\n" for raw in lines)


def test_a_real_adaptive_run_continues_its_clip_norm_and_the_report_rechecks_it(tmp_path, one_conv_route):
    images, labels = tiny_site(96)
    path = tmp_path / "ledger.jsonl"
    privacy = PrivacyConfig(target_epsilon=2.0, planned_rounds=2, max_grad_norm=1000.0, clip_quantile=0.5)
    model = build_model(SMALL_MODEL, seed=0)
    first = _round(model, images, labels, path, privacy, 1)
    second = _round(model, images, labels, path, privacy, 2)  # a fresh ledger object: as after a restart
    one, two = PrivacyLedger(path).entries
    for entry, result in ((one, first), (two, second)):
        assert entry.clip_quantile == 0.5 and entry.clip_norm_ceiling == 1000.0
        assert entry.count_noise == pytest.approx(max(16 / 20, entry.noise_multiplier))
        assert joint_noise(entry.gradient_noise_multiplier, entry.count_noise) == pytest.approx(entry.noise_multiplier)
        assert result.noise_multiplier == entry.gradient_noise_multiplier
    assert one.max_grad_norm == 1000.0 and one.clip_norm_after < 800.0, "every record unclipped: the norm falls"
    assert two.max_grad_norm == one.clip_norm_after and two.clip_norm_after < one.clip_norm_after

    _, findings = ledger_account(path)
    assert not [f for f in findings if f.level == "critical"], findings
    text = to_markdown(report_document(build_report(None, [path]), []))
    assert f"clip norm 1000 -> {two.clip_norm_after:.3g} (adaptive, quantile 0.5;" in text, "the run's summary"
    assert f"quantile 0.5, clip norm to {one.clip_norm_after:.4g} (ceiling 1000)" in text, "round 1's row"
    edited = tmp_path / "edited.jsonl"
    edited.write_text(_edited(path.read_text(), 0, gradient_noise_multiplier=one.gradient_noise_multiplier * 0.9))
    _, findings = ledger_account(edited)
    [finding] = [f for f in findings if f.level == "critical"]
    assert finding.code == "ledger-arithmetic" and "run adapt round 1:" in finding.message
    assert "joint noise multiplier" in finding.message
    edited.write_text(_edited(path.read_text(), 1, clip_norm_after=1500.0))
    _, findings = ledger_account(edited)
    [finding] = [f for f in findings if f.level == "critical"]
    assert finding.code == "ledger-arithmetic" and "run adapt round 2:" in finding.message
    assert "ceiling 1000 (max_grad_norm)" in finding.message


def test_the_update_carries_the_gradients_share_of_the_noise(tmp_path, one_conv_route):
    """With every record in the one step (sample rate 1), repeated steps from one model differ
    by the noise alone: its spread is lr * z_grad * C / n, z_grad the gradient's share of the
    ledger's joint multiplier (here far enough above it to tell them apart)."""
    rng = np.random.default_rng(0)
    n, clip = 32, 0.5
    images, labels = rng.random((n, 16, 16), dtype=np.float32), rng.integers(0, 2, n)
    initial = torch.cat([p.detach().flatten() for p in build_model(SMALL_MODEL, seed=0).parameters()])
    moves = []
    for repeat in range(8):
        model = build_model(SMALL_MODEL, seed=0)
        train = TrainConfig(batch_size=n, steps=1, learning_rate=1.0, momentum=0.0, insecure_noise_seed=repeat)
        privacy = PrivacyConfig(target_epsilon=4.0, max_grad_norm=clip, clip_quantile=0.5)
        ledger = PrivacyLedger(tmp_path / f"{repeat}.jsonl")
        train_round(model, TrainingData(images, labels), train=train, privacy=privacy, ledger=ledger, site="s",
                    run_id="r", round_number=1)
        moves.append(torch.cat([p.detach().flatten() for p in model.parameters()]) - initial)
    [entry] = ledger.entries
    assert entry.gradient_noise_multiplier > 1.05 * entry.noise_multiplier
    spread = torch.stack(moves).var(dim=0).mean().sqrt().item()
    assert spread == pytest.approx(entry.gradient_noise_multiplier * clip / n, rel=0.02)


def _todays_fixed_round(model, images, labels, train: TrainConfig, rate: float, steps: int, sigma: float,
                        clip: float) -> None:
    """DP-SGD as ``fedmed.train`` ran it before adaptive clipping, written out: Poisson
    batches, clipped sums, noise sigma * clip from the round's noise generator, the mean over
    the expected batch."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    seeds = np.random.SeedSequence([train.insecure_noise_seed, 1]).generate_state(2, dtype=np.uint64)
    sampling, noise = (torch.Generator().manual_seed(int(s >> 1)) for s in seeds)
    model.train()
    clipper = PerSampleClipper(model, clip, conv_route="unfold")
    optimizer = torch.optim.SGD(model.parameters(), lr=train.learning_rate, momentum=train.momentum,
                                weight_decay=train.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
    for batch in UniformWithReplacementSampler(num_samples=len(labels), sample_rate=rate, generator=sampling,
                                               steps=steps):
        flat.zero_()
        rows = np.asarray(batch, dtype=np.int64)
        for start in range(0, len(rows), train.physical_batch_size):
            chunk = rows[start:start + train.physical_batch_size]
            x = torch.from_numpy(np.ascontiguousarray(images[chunk], dtype=np.float32)).unsqueeze(1)
            y = torch.from_numpy(labels[chunk])
            clipper.accumulate(x, lambda out, y=y: F.cross_entropy(out + 0.0, y, reduction="none"))
        flat.add_(torch.empty_like(flat).normal_(0.0, sigma * clip, generator=noise))
        flat.div_(rate * len(labels))
        optimizer.step()
    clipper.remove()


def test_clip_quantile_zero_trains_bit_for_bit_as_before(tmp_path, one_conv_route):
    images, labels = tiny_site(96)
    train = TrainConfig(batch_size=16, physical_batch_size=8, steps=4, learning_rate=0.05, insecure_noise_seed=5)
    trained = []
    for name, privacy in (("zero", PrivacyConfig(target_epsilon=1.0, max_grad_norm=0.3, clip_quantile=0.0)),
                          ("absent", PrivacyConfig(target_epsilon=1.0, max_grad_norm=0.3))):
        model = build_model(SMALL_MODEL, seed=0)
        result = train_round(model, TrainingData(images, labels), train=train, privacy=privacy,
                             ledger=PrivacyLedger(tmp_path / f"{name}.jsonl"), site="s", run_id="r", round_number=1)
        trained.append(model)
    [entry] = PrivacyLedger(tmp_path / "zero.jsonl").entries
    assert entry.clip_quantile is entry.gradient_noise_multiplier is entry.clip_norm_after is None
    line = json.loads((tmp_path / "zero.jsonl").read_text())
    assert not {"clip_quantile", "gradient_noise_multiplier", "count_noise", "clip_norm_after"} & set(line), \
        "a fixed-clip line is written as before: a fedmed older than adaptive clipping still reads it"
    assert result.noise_multiplier == entry.noise_multiplier and entry.max_grad_norm == 0.3
    reference = build_model(SMALL_MODEL, seed=0)
    _todays_fixed_round(reference, images, labels, train, entry.sample_rate, entry.steps, entry.noise_multiplier, 0.3)
    for model in trained:
        for mine, theirs in zip(model.parameters(), reference.parameters()):
            assert torch.equal(mine, theirs)


def test_a_clip_quantile_outside_zero_to_one_is_refused_by_name():
    with pytest.raises(ValueError, match=r"training\.clip_quantile must be in \[0, 1\), got 1\.5"):
        RunSettings(clip_quantile=1.5)
    with pytest.raises(ValueError, match=r"the run config: training\.clip_quantile must be in \[0, 1\), got 1\.5"):
        RunSettings.from_flower({**RunSettings().to_flower(), "clip-quantile": 1.5})
    with pytest.raises(ValueError, match=r"training\.clip_learning_rate must be in \(0, 10\], got 0\.0"):
        RunSettings(clip_learning_rate=0.0)
    with pytest.raises(ValueError, match="clip_quantile must be in"):
        PrivacyConfig(clip_quantile=1.0)
    run = RunSettings(clip_quantile=0.5, clip_learning_rate=0.3)
    privacy = PrivacyConfig.from_settings(SiteSettings(), run)
    assert (privacy.clip_quantile, privacy.clip_learning_rate, privacy.adaptive_clipping) == (0.5, 0.3, True)
