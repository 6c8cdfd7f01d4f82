"""One round of local training at a site, private by default, and evaluation.

A private round runs DP-SGD: Poisson sampling of each logical batch (Opacus's
``UniformWithReplacementSampler``), per-sample clipping to ``max_grad_norm``, Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm`` on the summed gradient, and an
average over the expected batch size. A logical batch is processed in physical chunks of
``physical_batch_size``, so memory does not grow with the logical batch. With
``clip_quantile`` the clip norm moves each step towards that quantile of the records'
gradient norms, never above ``max_grad_norm`` (``fedmed.privacy.adaptive_clipping``).

Unbalanced classes are handled with a logit-adjusted loss for a public ``class_prior``
(Menon et al. 2021: cross-entropy of logits + log prior, so the unadjusted logits'
argmax targets balanced accuracy) and with ``class_weights``. Neither may be computed from
the site's own data (that would make every sample's gradient depend on the other
records and void the DP analysis): use published prevalence figures. Under DP the class
weights scale each sample's gradient after clipping, divided by the largest weight: a
weight on the loss before clipping is mostly undone by the clipping (every large gradient
ends at the clip norm whatever its weight), and a weight above 1 would raise the
sensitivity above the clip norm.

Training runs where the model is (``fedmed.device``; a site's ``resources.device``): the
batches, the per-sample clipping, the clipped sum and the noise are computed there, and
the trained weights leave as CPU arrays, the same on every device (``model_state``).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed.config import RunSettings
from fedmed.device import device_of, exact_float32, resolve_device
from fedmed.metrics import classification_metrics
from fedmed.privacy.accounting import HistoryLike
from fedmed.privacy.adaptive_clipping import AdaptiveClipping
from fedmed.privacy.budget import PrivacyConfig, RoundPrivacy
from fedmed.privacy.clipping import PerSampleClipper
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.spending import RoundResult, SpendRequest, TrainedRound, spend_round

log = logging.getLogger("fedmed")


@dataclass(frozen=True)
class TrainConfig:
    """Local training of one round; defaults and meanings are those of ``RunSettings``."""

    epochs: int = RunSettings.local_epochs
    steps: int = RunSettings.local_steps  # steps per round; 0: ``epochs`` passes
    batch_size: int = RunSettings.batch_size  # logical (expected) batch size
    physical_batch_size: int = RunSettings.physical_batch_size  # memory bound of one pass
    learning_rate: float = RunSettings.learning_rate
    momentum: float = RunSettings.momentum
    weight_decay: float = RunSettings.weight_decay
    class_weights: tuple[float, ...] | None = None
    class_prior: tuple[float, ...] | None = None  # public prevalence; the loss is logit-adjusted by it
    seed: int = RunSettings.seed  # shuffling of non-private rounds; DP rounds draw secret randomness
    # Reproducible DP sampling and noise, for experiments only: noise an observer can
    # regenerate gives no protection, so sites leave this None (OS randomness).
    insecure_noise_seed: int | None = None

    @classmethod
    def from_settings(cls, run: RunSettings, round_number: int = 1) -> TrainConfig:
        """The training of one round (the learning rate follows the run's schedule)."""
        return cls(
            epochs=run.local_epochs,
            steps=run.local_steps,
            batch_size=run.batch_size,
            physical_batch_size=run.physical_batch_size,
            learning_rate=run.round_learning_rate(round_number),
            momentum=run.momentum,
            weight_decay=run.weight_decay,
            class_weights=run.class_weight_values,
            class_prior=run.class_prior_values,
            seed=run.seed,
        )


@dataclass(frozen=True)
class TrainingData:
    """A site's training split as the step loop reads it: images (or the model's fixed
    inputs, ``fedmed.model.fixed_inputs``) and labels; with ``patient_of`` (each image's
    patient number, from :func:`privacy_unit`) a patient is the protected record."""

    images: np.ndarray
    labels: np.ndarray
    patient_of: np.ndarray | None = None
    # ``fedmed audit`` only: gradient canaries, one record each, given as the coordinate of
    # the model's trainable parameters (flattened in order) that each one's gradient points
    # along. A sampled canary adds the step's clip norm there, as a clipped record would (and
    # counts as unclipped under adaptive clipping); DP-SGD rounds only. Sites never have any.
    canaries: np.ndarray | None = None


def train_round(
    model: nn.Module,
    data: TrainingData,
    *,
    train: TrainConfig,
    privacy: PrivacyConfig,
    ledger: PrivacyLedger,
    site: str,
    run_id: str,
    round_number: int,
    reserved: HistoryLike = (),
    device: str | torch.device | None = None,
) -> RoundResult:
    """Train ``model`` in place for one round unless the site's budget forbids it; the
    spend (or the refusal) is recorded in ``ledger`` (``fedmed.privacy.spending``).
    ``device`` (a ``resources.device`` name or a torch device) moves ``model`` there
    first; None trains where the model already is.

    At patient level patients are Poisson-sampled, each patient's summed gradient is
    clipped, and the accounting uses the patient sampling rate, with the same expected
    number of images per step as image-level training. ``reserved`` is the privacy cost of
    the run's releases still to come (``fedmed.privacy.release``)."""
    if device is not None:
        model.to(resolve_device(device) if isinstance(device, str) else device)
    examples = len(data.labels)
    records = record_count(data.labels, data.patient_of)
    request = SpendRequest(
        site=site,
        run_id=run_id,
        round=round_number,
        records=records,
        examples=examples,
        expected_batch=train.batch_size * records / examples,
        epochs=train.epochs,
        steps=train.steps,
        unit="image" if data.patient_of is None else "patient",
    )

    def run_steps(plan: RoundPrivacy, clipping: AdaptiveClipping | None) -> TrainedRound:
        with exact_float32(device_of(model)):
            return train_steps(plan, clipping)

    def train_steps(plan: RoundPrivacy, clipping: AdaptiveClipping | None) -> TrainedRound:
        if plan.dp:
            return _train_private(
                model,
                data,
                train=train,
                plan=plan,
                round_number=round_number,
                max_grad_norm=privacy.max_grad_norm,
                clipping=clipping,
            )
        loss = _train_plain(
            model, data, train=train, steps=plan.steps, round_number=round_number, max_grad_norm=privacy.max_grad_norm
        )
        return TrainedRound(loss, privacy.max_grad_norm)

    return spend_round(ledger, privacy, request, run_steps, reserved)


def privacy_unit(privacy: PrivacyConfig, patients: np.ndarray | None, site: str) -> tuple[str, np.ndarray | None]:
    """("patient", each image's patient number 0..P-1) when the site protects patients and
    every image has a PatientID; else ("image", None), with a warning when the site's images
    lack PatientIDs (``patients`` None: the caller knows no patients)."""
    if privacy.privacy_unit != "patient" or not privacy.dp or patients is None:
        return "image", None
    if len(patients) == 0 or any(not str(p) for p in patients):
        log.warning(
            "site %s: privacy_unit is 'patient' but not every training image has a PatientID; training "
            "at image level (a patient with k images is protected by about k x epsilon)",
            site,
        )
        return "image", None
    _, patient_of = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    return "patient", patient_of.astype(np.int64)


def record_count(labels: np.ndarray, patient_of: np.ndarray | None) -> int:
    """The protected records among training images: the images, or their patients."""
    return len(labels) if patient_of is None else int(patient_of.max()) + 1


def _patient_batches(
    sampled: np.ndarray, members: list[np.ndarray], physical: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The images of the sampled patients as (image indices, group per image) batches of
    about ``physical`` images; a patient's images always share a batch, so each patient's
    gradient is clipped whole."""
    batches: list[tuple[np.ndarray, np.ndarray]] = []
    images: list[np.ndarray] = []
    groups: list[np.ndarray] = []
    count = 0
    for patient in sampled:
        rows = members[patient]
        if images and count + len(rows) > physical:
            batches.append((np.concatenate(images), np.concatenate(groups)))
            images, groups, count = [], [], 0
        groups.append(np.full(len(rows), len(images), dtype=np.int64))
        images.append(rows)
        count += len(rows)
    if images:
        batches.append((np.concatenate(images), np.concatenate(groups)))
    return batches


def _loss_function(train: TrainConfig, labels: torch.Tensor, weighted: bool = True):
    """Per-sample losses; ``weighted=False`` leaves the class weights out (DP applies them
    after clipping, see :func:`_clipped_gradient_weights`)."""
    on = labels.device
    weights = (
        torch.tensor(train.class_weights, dtype=torch.float32, device=on) if train.class_weights and weighted else None
    )
    prior = torch.tensor(train.class_prior, dtype=torch.float32, device=on) if train.class_prior else None
    adjustment = torch.log(prior / prior.sum()) if prior is not None else 0.0

    def per_sample(outputs: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs + adjustment, labels, weight=weights, reduction="none")

    return per_sample


def _clipped_gradient_weights(train: TrainConfig, labels: torch.Tensor) -> torch.Tensor | None:
    """Each sample's class weight divided by the largest, applied to its clipped gradient."""
    if not train.class_weights:
        return None
    weights = torch.tensor(train.class_weights, dtype=torch.float32, device=labels.device)
    return (weights / weights.max())[labels]


def _optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        model.parameters(), lr=train.learning_rate, momentum=train.momentum, weight_decay=train.weight_decay
    )


def _images(images: np.ndarray, indices: np.ndarray, device: torch.device) -> torch.Tensor:
    """Selected images as a (batch, 1, H, W) tensor on ``device``, or precomputed inputs
    (``fedmed.model.fixed_inputs``, already (N, C, H, W)) as they are; only these rows are
    read from a memory map."""
    batch = torch.from_numpy(np.ascontiguousarray(images[indices], dtype=np.float32)).to(device)
    return batch.unsqueeze(1) if batch.dim() == 3 else batch


def _batch(
    images: np.ndarray, labels: np.ndarray, indices: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    labels_of = torch.from_numpy(np.asarray(labels[indices], dtype=np.int64)).to(device)
    return _images(images, indices, device), labels_of


def _train_private(
    model: nn.Module,
    data: TrainingData,
    *,
    train: TrainConfig,
    plan: RoundPrivacy,
    round_number: int,
    max_grad_norm: float,
    clipping: AdaptiveClipping | None = None,
) -> TrainedRound:
    """DP-SGD steps of ``plan``; with ``data.patient_of`` the sampled and clipped records are
    patients. Without ``clipping`` the clip norm is ``max_grad_norm`` and the noise
    multiplier the plan's; with it, both follow ``clipping`` (the clip norm step by step).
    Everything of a step but the sampling is computed on the model's device."""
    images, labels, patient_of = data.images, data.labels, data.patient_of
    device = device_of(model)
    sample_rate, steps = plan.sample_rate, plan.steps
    noise_multiplier = plan.noise_multiplier if clipping is None else clipping.gradient_noise
    clip_norm = max_grad_norm if clipping is None else clipping.start
    model.train()
    n = len(labels) if patient_of is None else int(patient_of.max()) + 1
    members = None  # each patient's image rows, by one sort instead of a scan per patient
    row_of = None  # where every patient has one image: a patient's row, and images are clipped alone
    if patient_of is not None and n == len(labels):
        row_of = np.argsort(patient_of, kind="stable")
    elif patient_of is not None:
        boundaries = np.cumsum(np.bincount(patient_of, minlength=n))[:-1]
        members = np.split(np.argsort(patient_of, kind="stable"), boundaries)
    sampling, noise = _dp_generators(train.insecure_noise_seed, round_number, device)
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler  # opacus loads 1 s of modules

    canaries = np.zeros(0, dtype=np.int64) if data.canaries is None else np.asarray(data.canaries, dtype=np.int64)
    records = n + len(canaries)  # a canary is one more record, sampled like the others
    sampler = UniformWithReplacementSampler(
        num_samples=records, sample_rate=sample_rate, generator=sampling, steps=steps
    )
    clipper = PerSampleClipper(model, clip_norm)
    optimizer = _optimizer(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    # Every gradient is a view of one flat buffer, so a step clears it, adds the noise and
    # scales it in one operation each instead of one per parameter.
    flat = torch.zeros(sum(p.numel() for p in params), device=device)
    noise_buffer = torch.empty_like(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    total_loss, seen = 0.0, 0
    try:
        for batch_indices in sampler:
            flat.zero_()
            batch_indices = np.asarray(batch_indices, dtype=np.int64)
            drawn = len(batch_indices)  # records, canaries included
            canaries_drawn = canaries[batch_indices[batch_indices >= n] - n]
            unclipped = len(canaries_drawn)  # a canary's gradient is exactly the clip norm
            batch_indices = batch_indices[batch_indices < n]
            if row_of is not None:
                batch_indices = row_of[batch_indices]
            batches: Sequence[tuple[np.ndarray, np.ndarray | None]]  # groups: None at image level
            if members is None:
                batches = [
                    (batch_indices[start : start + train.physical_batch_size], None)
                    for start in range(0, len(batch_indices), train.physical_batch_size)
                ]
            else:
                batches = _patient_batches(batch_indices, members, train.physical_batch_size)
            for rows, groups in batches:
                x, y = _batch(images, labels, rows, device)
                losses, norms = clipper.accumulate(
                    x,
                    _loss_function(train, y, weighted=False),
                    _clipped_gradient_weights(train, y),
                    None if groups is None else torch.from_numpy(groups).to(device),
                )
                total_loss += float(losses.sum())
                seen += len(y)
                if clipping is not None:
                    unclipped += int((norms <= clip_norm).sum())
            if len(canaries_drawn):
                flat.index_add_(
                    0,
                    torch.from_numpy(canaries_drawn).to(device),
                    torch.full((len(canaries_drawn),), float(clip_norm), device=device),
                )
            flat.add_(noise_buffer.normal_(0.0, noise_multiplier * clip_norm, generator=noise))
            flat.div_(sample_rate * records)
            optimizer.step()
            if clipping is not None:
                clip_norm = _next_clip_norm(clipping, clip_norm, unclipped, drawn, sample_rate * records, noise)
                clipper.max_grad_norm = clip_norm
    finally:
        clipper.remove()
        model.zero_grad(set_to_none=True)  # the buffer is not kept past the round
    return TrainedRound(total_loss / seen if seen else math.nan, clip_norm)


def _next_clip_norm(
    clipping: AdaptiveClipping,
    clip_norm: float,
    unclipped: int,
    drawn: int,
    expected_records: float,
    noise: torch.Generator,
) -> float:
    """The clip norm after a step, from its count of unclipped records and the count's noise,
    drawn from the step's (secret) noise generator after the gradient's."""
    count = torch.empty(1, dtype=torch.float64, device=noise.device)
    count_noise = float(count.normal_(0.0, clipping.count_noise, generator=noise))
    return clipping.step(clip_norm, unclipped, drawn, count_noise, expected_records)


def _dp_generators(
    insecure_seed: int | None, round_number: int, device: torch.device | None = None
) -> tuple[torch.Generator, torch.Generator]:
    """Generators for Poisson sampling and Gaussian noise; secret unless a seed is forced
    (then each round still gets its own streams).

    Both are torch generators seeded with 63 bits from ``secrets`` (the OS's randomness).
    Sampling always draws on the CPU (Opacus's sampler draws there; a record's inclusion is
    one number per record). The noise is drawn where the gradients are: on the CPU by
    torch's CPU generator (Mersenne Twister), as always; on CUDA by a ``torch.Generator``
    on that device, which is torch's Philox4x32-10 generator, so the model-sized noise
    vector is drawn in place on the GPU each step instead of on the CPU and copied over.
    The two devices therefore draw different noise from the same seed, of the same
    distribution; a forced seed reproduces a round only on the same kind of device."""
    on = torch.device("cpu") if device is None else device
    if insecure_seed is None:
        return (
            torch.Generator().manual_seed(secrets.randbits(63)),
            torch.Generator(device=on).manual_seed(secrets.randbits(63)),
        )
    seeds = np.random.SeedSequence([insecure_seed, round_number]).generate_state(2, dtype=np.uint64)
    return (
        torch.Generator().manual_seed(int(seeds[0] >> 1)),
        torch.Generator(device=on).manual_seed(int(seeds[1] >> 1)),
    )


def _train_plain(
    model: nn.Module, data: TrainingData, *, train: TrainConfig, steps: int, round_number: int, max_grad_norm: float
) -> float:
    """Non-private SGD; each batch's mean gradient is clipped to ``max_grad_norm``, so a
    step size tuned for DP-SGD (whose averaged clipped gradients are never longer than the
    clip norm) does not diverge here, and one recipe serves both modes."""
    images, labels = data.images, data.labels
    device = device_of(model)
    model.train()
    n = len(labels)
    rng = np.random.default_rng([train.seed, round_number])
    optimizer = _optimizer(model, train)
    total_loss, seen, order = 0.0, 0, np.array([], dtype=np.int64)
    for _ in range(steps):
        if len(order) < min(train.batch_size, n):
            order = np.concatenate([order, rng.permutation(n)])
        batch_indices, order = order[: train.batch_size], order[train.batch_size :]
        optimizer.zero_grad()
        for start in range(0, len(batch_indices), train.physical_batch_size):
            x, y = _batch(images, labels, batch_indices[start : start + train.physical_batch_size], device)
            losses = _loss_function(train, y)(model(x))
            (losses.sum() / len(batch_indices)).backward()
            total_loss += float(losses.detach().sum())
            seen += len(y)
        nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return total_loss / seen if seen else math.nan


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class probabilities, (n, classes), computed on the model's device."""
    model.eval()
    device = device_of(model)
    with exact_float32(device):
        outputs = [
            torch.softmax(model(_images(images, np.arange(s, min(s + batch_size, len(images))), device)), 1).cpu()
            for s in range(0, len(images), batch_size)
        ]
    return torch.cat(outputs).numpy() if outputs else np.zeros((0, 2), dtype=np.float32)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> dict:
    """Loss and classification metrics of ``model`` on a labelled set."""
    probabilities = predict(model, images, batch_size)
    metrics = classification_metrics(labels, probabilities)
    picked = probabilities[np.arange(len(labels)), labels] if len(labels) else np.array([1.0])
    metrics["loss"] = float(-np.log(np.clip(picked, 1e-12, None)).mean())
    return metrics
