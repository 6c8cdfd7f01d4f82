"""The model card written next to the final model."""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime, timezone

from fedmed.config import RunSettings
from fedmed.data.cache import PREPROCESSING_VERSION
from fedmed.model import ModelConfig
from fedmed.numbers import format_epsilon, format_number

PREPROCESSING = (
    "DICOM pixel data -> Modality LUT (rescale slope/intercept) -> VOI LUT or the first "
    "window centre/width, else the image's min-max -> MONOCHROME1 inverted -> colour to grey "
    "-> zero-padded to square -> antialiased resize -> float32 in [0, 1], one channel"
)


def model_card(run: RunSettings, sites: dict[str, dict], rounds_done: int, validation: dict | None) -> dict:
    """Facts a user of the model needs: what it is, what it was trained on, at what privacy cost."""
    return {
        "format": "fedmed-model/1: numpy .npz of named float arrays (model.npz); "
                  "rebuild with fedmed.model.build_model(ModelConfig(**architecture))",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run.run_id,
        "architecture": asdict(ModelConfig.from_settings(run)),
        "classes": list(run.class_names),
        "input": {"image_size": run.image_size, "channels": 1, "range": [0.0, 1.0],
                  "preprocessing": PREPROCESSING, "preprocessing_version": PREPROCESSING_VERSION},
        "training": {"rounds_planned": run.rounds, "rounds_completed": rounds_done,
                     "local_epochs": run.local_epochs, "batch_size": run.batch_size,
                     "learning_rate": run.learning_rate, "momentum": run.momentum,
                     "max_grad_norm": run.max_grad_norm, "aggregation": _aggregation(run)},
        "decision": decision_rule(run),
        "settings": run.user_settings(),
        "sites": sites,
        "validation": validation,
    }


def decision_rule(run: RunSettings) -> dict:
    """The model's operating point and where it came from: run settings only, never a
    site's data, so choosing it spends no privacy."""
    rule = "the most likely class (two classes: the second class when its probability is at least 0.5)"
    if run.class_prior:
        chosen = (f"from the public class prior training.class_prior = {run.class_prior}: the sites trained with "
                  "a loss logit-adjusted by it (Menon et al. 2021), so this rule targets balanced accuracy")
    else:
        chosen = ("no class prior was given: the rule of a plainly trained model, which favours the majority "
                  "class on unbalanced data; set training.class_prior to a public prevalence")
    return {"rule": rule, "chosen_from": chosen, "site_data_used": False,
            "note": "balanced accuracy, sensitivity and specificity in fedmed's tables are measured at this rule"}


def _aggregation(run: RunSettings) -> str:
    text = "FedAvg weighted by each site's training examples"
    if run.server_learning_rate != 1.0 or run.server_momentum != 0.0:
        text += (f", server step {run.server_learning_rate:g} with server momentum {run.server_momentum:g}"
                 " (FedAvgM)")
    return text


def model_card_markdown(card: dict) -> str:
    arch = card["architecture"]
    lines = [
        f"# fedmed model card: run {card['run_id']}",
        "",
        f"- Architecture: GroupNorm ResNet-{arch['depth']}, width {arch['width']}, {arch['frontend']} front-end, "
        f"{arch['in_channels']} input channel, {arch['num_classes']} classes ({', '.join(card['classes'])})",
        f"- Input: {card['input']['image_size']} x {card['input']['image_size']} px; {card['input']['preprocessing']}",
        f"- Training: {card['training']['rounds_completed']} of {card['training']['rounds_planned']} rounds, "
        f"{card['training']['aggregation']}",
        f"- Decision rule: {card['decision']['rule']}; chosen {card['decision']['chosen_from']}",
        f"- File: {card['format']}",
        "",
        "## Sites",
        "",
        "| site | training examples | rounds trained | epsilon | delta | private | last status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, site in sorted(card["sites"].items()):
        private = "yes" if site.get("dp", True) else "**NO (non-private baseline)**"
        lines.append(f"| {name} | {site.get('examples', '')} | {site.get('rounds_trained', 0)} | "
                     f"{format_epsilon(site.get('epsilon'), site.get('dp', True), 4)} | "
                     f"{format_number(site.get('delta'), 4)} | {private} | "
                     f"{site.get('status', '')} |")
    validation = card.get("validation") or {}
    if validation:
        lines += ["", "## Validation of the final model", ""]
        lines += [f"- {key}: {format_number(value, 4)}" for key, value in sorted(validation.items())]
    lines += ["", "## Settings", "", *(f"- {name}: {value}" for name, value in card["settings"].items())]
    return "\n".join(lines) + "\n"
