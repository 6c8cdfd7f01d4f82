"""Non-private training on public data: the starting point of a private federation.

DP-SGD's noise grows with every trained parameter and shrinks with the data in a step;
features learned on *public* data cost no privacy, and private fine-tuning from them comes
much closer to non-private accuracy than private training from random weights (Tramer &
Boneh 2021; De et al. 2022). This module trains fedmed's own network, with the run's
architecture so that ``--initial-model`` accepts the result, on public images only.

Rules it keeps:
* only data its caller declares public goes in; nothing here reads a site's data or
  ledger, and no privacy budget is spent (the model card says so);
* the validation split goes by patient where the data names patients;
* augmentation is what suits chest X-rays: small shifts, small rotations and contrast
  changes, never a horizontal flip (the heart is on one side);
* the class order is the run's: public label i trains output i.

It trains on the device it is given (``fedmed pretrain --device``, a simulation's
``resources.device``); the augmentations are drawn on the CPU from the run's seed either
way, so both devices see the same shifted and rotated images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedmed.config import PretrainSettings, RunSettings
from fedmed.data.split import split_by_patient
from fedmed.device import device_of, resolve_device
from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.train import evaluate
from fedmed.weights import model_state

MAX_SHIFT = 1 / 14  # of the image side (2 px at 28 px)
MAX_ROTATION = math.radians(10)
CONTRAST = (0.8, 1.2)  # multiplies the deviation from the image's mean
BRIGHTNESS = 0.1  # added, at most, in [0, 1] units
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9


@dataclass(frozen=True)
class EpochRecord:
    """One epoch of pre-training, as shown and written to the model card."""

    epoch: int
    learning_rate: float
    train_loss: float
    val_auroc: float | None
    val_balanced_accuracy: float | None


@dataclass(frozen=True)
class PretrainResult:
    """The chosen weights, every epoch's record, and which epoch the weights are from."""

    state: dict[str, np.ndarray]
    history: list[EpochRecord]
    kept_epoch: int
    train_images: int
    val_images: int


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image (B, 1, H, W) shifted, rotated and contrast-changed by its own random
    amount, drawn from ``generator`` (a CPU one) and applied on the images' device."""
    n = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(images.device)

    angle = uniform(-MAX_ROTATION, MAX_ROTATION)
    shift = uniform(-2 * MAX_SHIFT, 2 * MAX_SHIFT), uniform(-2 * MAX_SHIFT, 2 * MAX_SHIFT)  # grid units: side = 2
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = angle.cos(), -angle.sin(), shift[0]
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = angle.sin(), angle.cos(), shift[1]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images, grid, padding_mode="zeros", align_corners=False)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(*CONTRAST).view(n, 1, 1, 1)
    brightness = uniform(-BRIGHTNESS, BRIGHTNESS).view(n, 1, 1, 1)
    return ((moved - mean) * contrast + mean + brightness).clamp(0.0, 1.0)


def pretrain(
    images: np.ndarray,
    labels: np.ndarray,
    patient_ids: list[str] | tuple[str, ...],
    run: RunSettings,
    settings: PretrainSettings,
    *,
    progress: Callable[[EpochRecord], None] | None = None,
    device: str | torch.device = "cpu",
) -> PretrainResult:
    """Train the run's architecture on public ``images`` (N, H, W) in [0, 1] at the run's
    size, without privacy, on ``device`` (a ``resources.device`` name or a torch device);
    returns the last epoch's weights, or with ``patience`` the best validation epoch's."""
    device = resolve_device(device) if isinstance(device, str) else device
    classes = len(run.class_names)
    if len(labels) == 0 or int(labels.max()) >= classes:
        raise ValueError(
            f"the public labels go up to {int(labels.max()) if len(labels) else 'nothing'}; the run has "
            f"{classes} classes ({run.classes}): the public data's labels must use the run's class order"
        )
    if images.shape[1:] != (run.image_size, run.image_size):
        raise ValueError(
            f"public images are {images.shape[1]} x {images.shape[2]} px, the run trains at "
            f"{run.image_size} px: read them at data.image_size"
        )
    train_idx, val_idx = split_by_patient(labels, list(patient_ids), settings.val_fraction, run.seed)
    model = build_model(ModelConfig.from_settings(run), seed=run.seed).to(device)
    if not settings.augment:  # the same images every epoch: a fixed front-end's output is computed once
        images = fixed_inputs(model, images)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=settings.learning_rate, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY
    )
    steps_per_epoch = max(1, math.ceil(len(train_idx) / settings.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(run.seed)
    order_rng = np.random.default_rng(run.seed)
    history: list[EpochRecord] = []
    best_state, best_auroc, kept, stale = model_state(model), -math.inf, 0, 0
    for epoch in range(1, settings.epochs + 1):
        rate = optimizer.param_groups[0]["lr"]
        loss = _train_epoch(
            model,
            images,
            labels,
            order_rng.permutation(train_idx),
            settings,
            optimizer=optimizer,
            schedule=schedule,
            generator=generator,
        )
        scores = evaluate(model, images[val_idx], labels[val_idx]) if len(val_idx) else None
        record = EpochRecord(epoch, rate, loss, _finite(scores, "auroc"), _finite(scores, "balanced_accuracy"))
        history.append(record)
        if progress is not None:
            progress(record)
        auroc = record.val_auroc if record.val_auroc is not None else -math.inf
        if settings.patience == 0 or auroc > best_auroc:
            best_state, best_auroc, kept, stale = model_state(model), auroc, epoch, 0
        else:
            stale += 1
            if stale >= settings.patience:
                break
    return PretrainResult(best_state, history, kept, len(train_idx), len(val_idx))


def _train_epoch(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    order: np.ndarray,
    settings: PretrainSettings,
    *,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
) -> float:
    """One pass in mini-batches on the model's device; returns the mean training loss."""
    model.train()
    device = device_of(model)
    total, seen = 0.0, 0
    for start in range(0, len(order), settings.batch_size):
        rows = order[start : start + settings.batch_size]
        x = torch.from_numpy(np.ascontiguousarray(images[rows], dtype=np.float32)).to(device)
        x = x.unsqueeze(1) if x.dim() == 3 else x  # images, or precomputed front-end inputs
        y = torch.from_numpy(np.asarray(labels[rows], dtype=np.int64)).to(device)
        if settings.augment:
            x = augment(x, generator)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += float(loss.detach()) * len(rows)
        seen += len(rows)
    return total / seen if seen else math.nan


def _finite(scores: dict | None, key: str) -> float | None:
    value = None if scores is None else scores.get(key)
    return float(value) if value is not None and math.isfinite(value) else None


def pretrain_public(
    run: RunSettings,
    settings: PretrainSettings,
    out: Path,
    progress: Callable[[EpochRecord], None] | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Read ``settings.data`` (public), pre-train the run's architecture on it on
    ``device`` and write ``out`` as a model folder (``model.npz`` and its public model
    card), which ``--initial-model`` and ``fedmed predict`` accept; returns ``out``."""
    from fedmed.coordinator.model_card import public_model_card, public_model_card_markdown
    from fedmed.data.public import load_public  # Pillow and pydicom: only when pre-training
    from fedmed.rundir import write_model_folder

    if not settings.data:
        raise ValueError("no public data given (pretrain.data)")
    public = load_public(Path(settings.data), run.class_names, run.image_size)
    result = pretrain(public.images, public.labels, public.patient_ids, run, settings, progress=progress, device=device)
    card = public_model_card(
        run,
        settings,
        data=public.source,
        history=[asdict(r) for r in result.history],
        kept_epoch=result.kept_epoch,
        images={"train": result.train_images, "val": result.val_images},
        weights=result.state,
    )
    write_model_folder(out, result.state, card, public_model_card_markdown(card))
    return out
