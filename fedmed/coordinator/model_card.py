"""The model card written next to the final model."""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata

import numpy as np

from fedmed.config import PretrainSettings, RunSettings
from fedmed.data.cache import PREPROCESSING_VERSION
from fedmed.model import ModelConfig, card_architecture
from fedmed.numbers import format_epsilon, format_number
from fedmed.vector import pack

PREPROCESSING = (
    "DICOM pixel data -> Modality LUT (rescale slope/intercept) -> VOI LUT or the first "
    "window centre/width, else the image's min-max -> MONOCHROME1 inverted -> colour to grey "
    "-> zero-padded to square -> antialiased resize -> float32 in [0, 1], one channel"
)


SOFTWARE = ("fedmed", "torch", "flwr", "opacus", "kymatio", "pydicom", "numpy")
PRIVACY_UNIT_TEXT = {
    "patient": "one patient (patient-level DP-SGD): the guarantee bounds what the model reveals about all of "
    "one patient's training images together",
    "image": "one image (example-level DP-SGD): the guarantee bounds what the model reveals about any single "
    "training image; a patient with several images is protected up to that many times epsilon",
}


def weights_sha256(state: dict[str, np.ndarray]) -> str:
    """A fingerprint of the weights: SHA-256 of every array's float32 bytes in name order
    (``fedmed.vector.pack``), the same however the file was zipped."""
    return hashlib.sha256(pack(state).tobytes()).hexdigest()


def model_card(
    run: RunSettings,
    sites: dict[str, dict],
    rounds_done: int,
    validation: dict | None,
    *,
    weights: dict[str, np.ndarray] | None = None,
    held_out: dict | None = None,
    initial_model: dict | None = None,
) -> dict:
    """Facts a user of the model needs, under the headings of Model Cards for Model
    Reporting (Mitchell et al. 2019): what it is, what it is for, what it was trained and
    evaluated on, at what privacy cost, and where it falls short."""
    architecture = asdict(ModelConfig.from_settings(run))
    classes = list(run.class_names)
    return {
        "format": "fedmed-model/1: numpy .npz of named float arrays (model.npz); "
        "rebuild with fedmed.model.build_model(ModelConfig(**architecture))",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": run.run_id,
        "model_details": {
            "name": f"fedmed GroupNorm ResNet-{architecture['depth']} ({', '.join(classes)})",
            "type": "image classifier trained by federated averaging with differential privacy at every site",
            "weights_sha256": weights_sha256(weights) if weights is not None else None,
            "software": _versions(),
            "initial_model": initial_model or {"source": "random initialisation", "seed": run.seed},
        },
        "intended_use": {
            "primary_uses": (
                f"research on, and evaluation of, automatic classification of single grey "
                f"{run.image_size} x {run.image_size} px images into {', '.join(classes)}, as a "
                "second reader whose output a qualified clinician reviews"
            ),
            "primary_users": "hospital ML engineers and researchers; radiologists only through a validated tool",
            "out_of_scope": [
                "diagnosis or triage without a clinician's review",
                "deployment at a hospital before validating it on that hospital's own labelled studies "
                "(`fedmed predict MODEL DATA` with class folders or a labelled manifest)",
                "modalities, body parts, projections or classes the training sites did not provide",
                "multi-frame studies (rejected by the reader) and colour images beyond a grey conversion",
            ],
        },
        "architecture": architecture,
        "classes": classes,
        "input": input_section(run),
        "training": {
            "rounds_planned": run.rounds,
            "rounds_completed": rounds_done,
            "local_epochs": run.local_epochs,
            "local_steps": run.local_steps,
            "batch_size": run.batch_size,
            "learning_rate": run.learning_rate,
            "learning_rate_schedule": run.learning_rate_schedule,
            "momentum": run.momentum,
            "max_grad_norm": run.max_grad_norm,
            "clip_quantile": run.clip_quantile,  # 0: fixed; else adaptive, max_grad_norm its ceiling
            "clip_learning_rate": run.clip_learning_rate,
            "class_prior": run.class_prior,
            "class_weights": run.class_weights,
            "aggregation": _aggregation(run),
        },
        "decision": decision_rule(run),
        "settings": run.user_settings(),
        "factors": {
            "relevant": [
                "the hospital (scanner, protocol, population)",
                "class balance at each hospital",
                "image size after preprocessing",
            ],
            "evaluation_factors": "per hospital (the sites' validation splits) and on the coordinator's held-out "
            "set when it has one",
        },
        "metrics": {
            "reported": ["AUROC", "balanced accuracy", "sensitivity", "specificity", "accuracy"],
            "operating_point": "the decision rule above; balanced accuracy, sensitivity and specificity are "
            "measured there, AUROC over all thresholds",
            "positive_class": classes[-1] if len(classes) == 2 else None,
        },
        "training_data": {
            "sites": sorted(sites),
            "examples": sum(int(site.get("examples", 0)) for site in sites.values()),
            "note": "each hospital's images stayed at that hospital; only DP-noised model updates left it",
        },
        "evaluation_data": {
            "held_out": (
                "the coordinator's own data (federation.server_eval_data)"
                if run.server_eval_data
                else "none: the coordinator held no test set"
            ),
            "sites": f"each site's validation split ({run.val_fraction:.0%} of its patients, never trained on)",
        },
        "quantitative_analyses": {"held_out": held_out, "sites_validation": validation},
        "privacy": {
            "unit": _privacy_unit(sites),
            "accountant": "Renyi DP of the subsampled Gaussian mechanism (Opacus), per site, over all its "
            "rounds and runs (the site's ledger)",
            "sites": {
                name: {key: site.get(key) for key in ("dp", "epsilon", "delta", "privacy_unit")}
                for name, site in sorted(sites.items())
            },
            "released_by_sites": "DP-noised model updates, record counts and validation counts (each in the "
            "site's ledger), the parameters of each site's guarantee, and whatever a site "
            "chose to release exactly (recorded in its ledger as a non-private release)",
        },
        "sites": {name: {**site, "rounds_joined": site.get("rounds_trained", 0)} for name, site in sites.items()},
        "validation": validation,
        "ethical_considerations": [
            "differential privacy bounds what the weights and the sites' noisy counts reveal about one "
            "protected record (see privacy), not what a site chose to release exactly",
            "a hospital whose patients differ from the training sites' may see lower accuracy for them; "
            "check sensitivity and specificity per subgroup before use",
        ],
        "caveats_and_recommendations": _limitations(run, sites),
    }


def _privacy_unit(sites: dict) -> str:
    """What one protected record is, as the sites reported it."""
    units = {site.get("privacy_unit", "image") for site in sites.values()} or {"image"}
    if len(units) == 1:
        return PRIVACY_UNIT_TEXT[units.pop()]
    return "; ".join(
        f"{name}: {PRIVACY_UNIT_TEXT[site.get('privacy_unit', 'image')]}" for name, site in sorted(sites.items())
    )


def _versions() -> dict:
    versions: dict[str, str | None] = {}
    for package in SOFTWARE:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _resolution_caveat(image_size: int) -> str:
    """What the training size hides; below 64 px, where a larger size exists in fedmed."""
    caveat = (
        f"inputs are downsampled to {image_size} x {image_size} px grey images: findings smaller than "
        "a few pixels at that size cannot be seen"
    )
    if image_size < 64:
        caveat += (
            "; where they matter, train at a larger data.image_size (simulations/synthetic-5-sites-64px.toml "
            "runs a federation at 64 px)"
        )
    return caveat


def _limitations(run: RunSettings, sites: dict[str, dict]) -> list[str]:
    limitations = [
        _resolution_caveat(run.image_size),
        "the training population is that of the sites listed; their class balance differed (label skew), "
        "and the model was not checked for bias across age, sex or scanner",
        "DP noise makes each training run differ: compare runs by their spread, not one number",
    ]
    if not run.server_eval_data:
        limitations.append("no held-out test set at the coordinator: the only results are the sites' validation")
    if any(not site.get("dp", True) for site in sites.values()):
        limitations.append("some sites trained WITHOUT differential privacy (a baseline): see privacy.sites")
    return limitations


def input_section(run: RunSettings) -> dict:
    """What the model takes: the same for a federated and a public model of ``run``'s settings."""
    return {
        "image_size": run.image_size,
        "channels": 1,
        "range": [0.0, 1.0],
        "preprocessing": PREPROCESSING,
        "preprocessing_version": PREPROCESSING_VERSION,
    }


def decision_rule(run: RunSettings) -> dict:
    """The model's operating point and where it came from: run settings only, never a
    site's data, so choosing it spends no privacy."""
    rule = "the most likely class (two classes: the second class when its probability is at least 0.5)"
    if run.class_prior:
        chosen = (
            f"from the public class prior training.class_prior = {run.class_prior}: the sites trained with "
            "a loss logit-adjusted by it (Menon et al. 2021), so this rule targets balanced accuracy"
        )
    else:
        chosen = (
            "no class prior was given: the rule of a plainly trained model, which favours the majority "
            "class on unbalanced data; set training.class_prior to a public prevalence"
        )
    return {
        "rule": rule,
        "chosen_from": chosen,
        "site_data_used": False,
        "note": "balanced accuracy, sensitivity and specificity in fedmed's tables are measured at this rule",
    }


def _aggregation(run: RunSettings) -> str:
    text = "FedAvg weighted by each site's training examples"
    if run.server_learning_rate != 1.0 or run.server_momentum != 0.0:
        text += f", server step {run.server_learning_rate:g} with server momentum {run.server_momentum:g} (FedAvgM)"
    return text


def _frontend_text(architecture: dict) -> str:
    """The front-end for people; a scattering one with its J, which sets what size of
    structure the stages see (cards from before J was recorded read as the rule's J)."""
    scales = card_architecture(architecture)["scattering_scales"]
    return f"{architecture['frontend']} front-end" + (f" (J={scales})" if scales else "")


def model_card_markdown(card: dict) -> str:
    """The card for people, under Mitchell et al.'s headings."""
    arch, details, use = card["architecture"], card["model_details"], card["intended_use"]
    initial = details["initial_model"]
    lines = [
        f"# Model card: {details['name']}, run {card['run_id']}",
        "",
        "## Model details",
        "",
        f"- {details['type']}; created {card['created']}",
        f"- Architecture: GroupNorm ResNet-{arch['depth']}, width {arch['width']}, {_frontend_text(arch)}, "
        f"{arch['in_channels']} input channel, {arch['num_classes']} classes ({', '.join(card['classes'])})",
        f"- Weights SHA-256 (float32 arrays in name order): {details['weights_sha256']}",
        f"- Started from: {initial.get('source')}"
        + (f" (weights {initial['weights_sha256']})" if initial.get("weights_sha256") else "")
        + (
            f"; pre-trained on PUBLIC data: {initial['public']['source']} ({initial['public']['terms']}; cite: "
            f"{initial['public']['citation']}), no site data, no privacy budget"
            if initial.get("public")
            else ""
        ),
        f"- Training: {card['training']['rounds_completed']} of {card['training']['rounds_planned']} rounds, "
        f"{card['training']['aggregation']}",
        f"- Software: {', '.join(f'{k} {v}' for k, v in details['software'].items() if v)}",
        f"- File: {card['format']}",
        "",
        "## Intended use",
        "",
        f"- Primary uses: {use['primary_uses']}",
        f"- Primary users: {use['primary_users']}",
        "- Out of scope:",
        *(f"  - {item}" for item in use["out_of_scope"]),
        "",
        "## Factors",
        "",
        f"- Relevant: {'; '.join(card['factors']['relevant'])}",
        f"- Evaluated: {card['factors']['evaluation_factors']}",
        "",
        "## Metrics",
        "",
        f"- Reported: {', '.join(card['metrics']['reported'])}",
        f"- Decision rule (operating point): {card['decision']['rule']}; how it was chosen: "
        f"{card['decision']['chosen_from']}",
        f"- Input: {card['input']['image_size']} x {card['input']['image_size']} px; {card['input']['preprocessing']}",
        "",
        "## Training data",
        "",
        f"About {card['training_data']['examples']} training records at {len(card['training_data']['sites'])} "
        "sites (each site's count of its protected records, patients or images as its privacy unit says, sent "
        f"with DP noise unless the site released it exactly); {card['training_data']['note']}.",
        "",
        "| site | training records (noisy) | rounds joined | epsilon | delta | private | last status |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, site in sorted(card["sites"].items()):
        private = "yes" if site.get("dp", True) else "**NO (non-private baseline)**"
        lines.append(
            f"| {name} | {site.get('examples', '')} | {site.get('rounds_joined', 0)} | "
            f"{format_epsilon(site.get('epsilon'), site.get('dp', True), 4)} | "
            f"{format_number(site.get('delta'), 4)} | {private} | "
            f"{site.get('status', '')} |"
        )
    lines += [
        "",
        "## Evaluation data",
        "",
        f"- Held out: {card['evaluation_data']['held_out']}",
        f"- Sites: {card['evaluation_data']['sites']}",
        "",
        "## Quantitative analyses",
        "",
    ]
    analyses = card["quantitative_analyses"]
    for title, values in (
        ("Held-out set (coordinator)", analyses["held_out"]),
        ("Sites' validation, weighted by their validation images", analyses["sites_validation"]),
    ):
        lines.append(
            f"{title}: "
            + (
                ", ".join(f"{k} {format_number(v, 4)}" for k, v in sorted(values.items()))
                if values
                else "not evaluated"
            )
        )
        lines.append("")
    privacy = card["privacy"]
    lines += [
        "## Privacy",
        "",
        f"- Unit: {privacy['unit']}",
        f"- Accountant: {privacy['accountant']}",
        f"- Released by the sites: {privacy['released_by_sites']}",
        "",
        "## Ethical considerations",
        "",
        *(f"- {item}" for item in card["ethical_considerations"]),
        "",
        "## Caveats and recommendations",
        "",
        *(f"- {item}" for item in card["caveats_and_recommendations"]),
        "",
        "## Settings",
        "",
        *(f"- {name}: {value}" for name, value in card["settings"].items()),
    ]
    return "\n".join(lines) + "\n"


def public_model_card(
    run: RunSettings,
    settings: PretrainSettings,
    *,
    data: str,
    history: list[dict],
    kept_epoch: int,
    images: dict[str, int],
    weights: dict[str, np.ndarray],
) -> dict:
    """The card of a model pre-trained on public data (``fedmed pretrain``): which public
    source, its terms and citation, and that no site's data or privacy budget went into it.
    It has the keys ``fedmed predict`` and ``--initial-model`` read from a run's card."""
    architecture = asdict(ModelConfig.from_settings(run))
    return {
        "format": "fedmed-model/1: numpy .npz of named float arrays (model.npz); "
        "rebuild with fedmed.model.build_model(ModelConfig(**architecture))",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_id": None,
        "model_details": {
            "name": f"fedmed GroupNorm ResNet-{architecture['depth']} pre-trained on public data",
            "type": "image classifier trained WITHOUT differential privacy on public data only, as the starting "
            "point of a private federation",
            "weights_sha256": weights_sha256(weights),
            "software": _versions(),
            "initial_model": {"source": "random initialisation", "seed": run.seed},
        },
        "public_pretraining": {
            "data": data,
            "source": settings.source_name or "not stated (fedmed pretrain --source-name)",
            "terms": settings.terms or "not stated (fedmed pretrain --terms)",
            "citation": settings.citation or "not stated (fedmed pretrain --citation)",
            "public_data_only": True,
            "site_data_used": False,
            "privacy_budget_spent": 0.0,
            "note": "public images carry no site's privacy: no ledger records anything for this model",
            "epochs": len(history),
            "kept_epoch": kept_epoch,
            "augment": settings.augment,
            "learning_rate": settings.learning_rate,
            "batch_size": settings.batch_size,
            "images": images,
            "history": history,
        },
        "architecture": architecture,
        "classes": list(run.class_names),
        "input": input_section(run),
        "decision": decision_rule(run),
        "settings": run.user_settings(),
        "caveats_and_recommendations": [
            "trained on a public population and task, which may differ from the sites' (e.g. adults against "
            "children, any finding against pneumonia): a starting point for fine-tuning, not a model to use as is",
        ],
    }


def public_model_card_markdown(card: dict) -> str:
    """The public model's card for people."""
    public, arch = card["public_pretraining"], card["architecture"]
    last = public["history"][-1] if public["history"] else {}
    return "\n".join(
        [
            f"# Model card: {card['model_details']['name']}",
            "",
            f"- {card['model_details']['type']}; created {card['created']}",
            f"- Architecture: GroupNorm ResNet-{arch['depth']}, width {arch['width']}, {_frontend_text(arch)}, "
            f"{arch['image_size']} px, classes {', '.join(card['classes'])}",
            f"- Weights SHA-256: {card['model_details']['weights_sha256']}",
            "",
            "## Public data",
            "",
            f"- Data: {public['data']}",
            f"- Source: {public['source']}",
            f"- Terms: {public['terms']}",
            f"- Citation: {public['citation']}",
            f"- Images: {public['images']['train']} for training, {public['images']['val']} for validation "
            "(split by patient where the data names patients)",
            "- **Public data only: no site's data was used and no privacy budget was spent.**",
            "",
            "## Training",
            "",
            f"- {public['epochs']} epochs (weights of epoch {public['kept_epoch']}), learning rate "
            f"{public['learning_rate']:g} cosine-decayed, batch {public['batch_size']}, augmentation "
            f"{'on (shifts, rotations, contrast; no flips)' if public['augment'] else 'off'}",
            f"- Last epoch's validation on the public data: AUROC {format_number(last.get('val_auroc'), 4)}, "
            f"balanced accuracy {format_number(last.get('val_balanced_accuracy'), 4)}",
            "",
            "## Caveats",
            "",
            *(f"- {item}" for item in card["caveats_and_recommendations"]),
            "",
        ]
    )
