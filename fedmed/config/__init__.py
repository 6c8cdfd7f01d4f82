"""Every setting of a run, a site and a simulation, declared once.

Each setting is a dataclass field whose metadata gives its TOML section, help text,
unit and allowed range. This module holds the declarations; the machinery that reads
them lives beside it (``fields``: checks and conversion; ``flower_config``: Flower's run
and node config; ``files``: TOML files and ``--set``; ``options``: command-line options).
Everything else derives from these declarations: the options
of ``fedmed-server``, ``fedmed-client`` and ``fedmed-simulate``, the sections and keys
of scenario and deployment TOML files, ``--set section.key=value``, Flower's run and
node config (dashed keys, converted only in ``to_flower``/``from_flower``), and the
settings recorded in a run directory and model card. A new field appears in all of them.

Names are the vocabulary: the field ``local_epochs`` of section ``training`` is the TOML
key ``training.local_epochs``, the option ``--local-epochs`` and Flower's
``local-epochs``.

This module imports no torch, torchvision, Opacus or Flower: the ClientApp and the
command-line tools read it before (or without) loading them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmed.config.fields import check_ranges, options
from fedmed.config.files import tomllib
from fedmed.config.flower_config import from_flower, to_flower
from fedmed.device import DEVICE_NAMES, check_device_name

__all__ = ["tomllib"]  # re-exported: the one TOML reader of Python 3.10 and 3.11+

SCHEDULES = ("constant", "cosine")  # learning rate over rounds: see RunSettings.round_learning_rate
FRONTENDS = ("pixels", "scattering")  # what the residual stages see: see fedmed.model
PRIVACY_UNITS = ("image", "patient")  # what one DP record is at a site
# Statistics a site may send exactly, without DP, when its settings say so (see fedmed.privacy.release).
EXACT_RELEASES = ("examples", "validation", "loss", "timing")
# How the coordinator combines the sites' bounded updates: see fedmed.coordinator.aggregation.
AGGREGATIONS = ("mean", "median", "trimmed-mean")
NORM_GROUPS = 8  # GroupNorm groups of the model; the model's width must be a multiple
# The most classes a run may name: the classifier's last layer grows with them, and the
# coordinator chooses them for every site (ImageNet has 1000; no medical task comes close).
MAX_CLASSES = 1000


def exact_releases(text: str) -> frozenset[str]:
    """The names in a ``privacy.release_exact`` value."""
    return frozenset(name.strip() for name in text.split(",") if name.strip())


def setting(
    default: Any,
    help: str,
    *,
    section: str,
    unit: str = "",
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
    choices: tuple | None = None,
    multiple_of: int | None = None,
    flag: str = "",
    required: bool = False,
    per_site: bool = False,
    in_scenario: bool = True,
    items: type | None = None,
) -> Any:
    """Declare one setting. ``low``/``high`` are inclusive bounds, ``above``/``below``
    exclusive ones. ``flag`` replaces the derived option name, ``required`` means the
    default is no value, ``per_site`` lets a scenario give one value per site, and
    ``in_scenario=False`` marks what a simulation sets by itself. ``items`` (float or str)
    marks a list setting: written as a TOML array, kept as comma-separated text."""
    return field(
        default=default,
        metadata={
            "section": section,
            "help": help,
            "unit": unit,
            "low": low,
            "high": high,
            "above": above,
            "below": below,
            "choices": choices,
            "multiple_of": multiple_of,
            "flag": flag,
            "required": required,
            "per_site": per_site,
            "in_scenario": in_scenario,
            "items": items,
        },
    )


def internal(default: Any, help: str) -> Any:
    """A value fedmed fills in itself (a path, an id); never an option or a file key."""
    return field(default=default, metadata={"section": "", "help": help, "internal": True})


# -- the settings -----------------------------------------------------------------------


def _per_class(text: str) -> tuple[float, ...] | None:
    return tuple(float(v) for v in text.split(",")) if text else None


def _check_per_class(name: str, text: str, classes: tuple[str, ...]) -> None:
    """A per-class list must give one positive number per class."""
    if not text:
        return
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"training.{name} must be comma-separated numbers, got {text!r}") from None
    if len(values) != len(classes):
        raise ValueError(
            f"training.{name} gives {len(values)} values for {len(classes)} classes ({', '.join(classes)})"
        )
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"training.{name} values must be positive, got {text!r}")


@dataclass(frozen=True)
class RunSettings:
    """What every party of one run agrees on. The coordinator sends it to every site as
    Flower's run config; a site's own settings (``SiteSettings``) never leave the site."""

    # data
    classes: str = setting(
        "normal,pneumonia",
        "class names in label order, a list (class folder names or manifest labels)",
        section="data",
        items=str,
    )
    image_size: int = setting(
        28, "training resolution: every image is resized to this side", section="data", unit="px", low=8, high=1024
    )
    val_fraction: float = setting(
        0.2, "share of each site's patients kept to validate the global model", section="data", low=0.0, below=1.0
    )
    # model
    depth: int = setting(18, "ResNet depth", section="model", choices=(10, 18, 34, 50))
    # The upper bounds of width and of the training settings cap what a coordinator can make
    # every site build, hold and run; each is far beyond any real run (fedmed's run width 8 to
    # 32, tens of rounds) yet keeps one request from asking a site for unbounded memory or time.
    # width 256 (4x torchvision's): a ResNet-50 of 375 M parameters, 1.4 GiB a model sent.
    width: int = setting(
        16,
        "channels of the first ResNet stage (torchvision's: 64); later stages have 2x, 4x, 8x",
        section="model",
        low=NORM_GROUPS,
        high=256,
        multiple_of=NORM_GROUPS,
    )
    frontend: str = setting(
        "pixels",
        "what the ResNet's stages learn from: pixels (a trained stem) or "
        "scattering (a fixed wavelet scattering transform, fewer trained parameters for "
        "DP to noise)",
        section="model",
        choices=FRONTENDS,
    )
    # training
    # rounds: daily rounds for 27 years; a site plans its releases over every round
    rounds: int = setting(3, "federated rounds", section="training", low=1, high=10_000)
    local_epochs: int = setting(1, "passes over a site's data per round", section="training", low=1, high=100)
    local_steps: int = setting(
        0,
        "DP-SGD steps per round at every site, whatever its size (0: local_epochs "
        "passes over its data); equal steps keep large sites from drifting further "
        "than small ones under label skew",
        section="training",
        low=0,
        high=10_000,
    )
    batch_size: int = setting(64, "expected (logical) batch size of each step", section="training", low=1, high=65_536)
    # physical_batch_size: per-sample gradients of this many images are held at once
    physical_batch_size: int = setting(
        64, "images per forward/backward pass; bounds memory, not the step", section="training", low=1, high=4096
    )
    learning_rate: float = setting(0.1, "the sites' SGD step size", section="training", above=0.0)
    learning_rate_schedule: str = setting(
        "constant",
        "the sites' step size over rounds: constant, or cosine "
        "(decays towards 0 by the last round, so late rounds add less "
        "noise to the model)",
        section="training",
        choices=SCHEDULES,
    )
    momentum: float = setting(0.9, "the sites' SGD momentum", section="training", low=0.0, below=1.0)
    weight_decay: float = setting(0.0, "the sites' SGD weight decay", section="training", low=0.0)
    max_grad_norm: float = setting(
        1.0,
        "DP-SGD clipping norm of each record's gradient; with clip_quantile, the adaptive clip "
        "norm's start and ceiling",
        section="training",
        above=0.0,
    )
    clip_quantile: float = setting(
        0.0,
        "adaptive clipping (Andrew et al. 2021): the share of records whose gradient the clip "
        "norm should leave unclipped, e.g. 0.5; each DP-SGD step moves the clip norm towards "
        "that quantile of the gradient norms, from a noisy count that shares the round's noise "
        "(no extra epsilon). It starts at max_grad_norm and never exceeds it, since the "
        "coordinator bounds an honest update with max_grad_norm (0: fixed clipping at max_grad_norm)",
        section="training",
        low=0.0,
        below=1.0,
    )
    clip_learning_rate: float = setting(
        0.2,
        "adaptive clipping: the clip norm's geometric step size towards clip_quantile per DP-SGD step",
        section="training",
        above=0.0,
        high=10.0,
    )
    class_weights: str = setting(
        "",
        "weight per class, a list, from public figures (never from a site's own "
        "data); under DP each sample's clipped gradient is scaled by its class's weight "
        "over the largest; empty: equal weights",
        section="training",
        items=float,
    )
    class_prior: str = setting(
        "",
        "public prevalence of each class, a list (published figures, never a "
        "site's own counts): the loss is logit-adjusted by it (Menon et al. 2021), so the "
        "model's most likely class targets balanced accuracy; empty: plain loss",
        section="training",
        items=float,
    )
    server_learning_rate: float = setting(
        1.0, "the coordinator's step towards the sites' average (1.0: FedAvg)", section="training", above=0.0
    )
    server_momentum: float = setting(
        0.0, "the coordinator's momentum over rounds (> 0: FedAvgM)", section="training", low=0.0, below=1.0
    )
    evaluate_every: int = setting(
        1,
        "rounds between evaluations of the global model, by the sites on their "
        "validation splits and by the coordinator on its evaluation data (the "
        "initial and the final model are always evaluated)",
        section="training",
        low=1,
    )
    seed: int = setting(
        0,
        "seed of the initial model, site sampling, validation splits and non-private "
        "shuffling (DP noise is always secret)",
        section="training",
        low=0,
    )
    # federation (the coordinator's; a simulation sets these itself)
    min_sites: int = setting(
        2,
        "sites needed to start, and valid updates needed to change the model in a round",
        section="federation",
        low=1,
        in_scenario=False,
    )
    fraction_train: float = setting(
        1.0,
        "fraction of connected sites asked to train each round",
        section="federation",
        above=0.0,
        high=1.0,
        in_scenario=False,
    )
    round_timeout: float = setting(
        600.0,
        "seconds to wait for the sites' replies in a round",
        section="federation",
        unit="s",
        above=0.0,
        in_scenario=False,
    )
    site_wait_timeout: float = setting(
        600.0,
        "seconds to wait for min_sites hospitals to connect",
        section="federation",
        unit="s",
        above=0.0,
        in_scenario=False,
    )
    aggregation: str = setting(
        "mean",
        "how the coordinator combines the sites' updates: mean (FedAvg, weighted "
        "by record counts), or the coordinate-wise median or trimmed-mean (unweighted; "
        "one outlier site cannot steer them)",
        section="federation",
        choices=AGGREGATIONS,
    )
    trim_fraction: float = setting(
        0.2,
        "trimmed-mean: share of the updates dropped at each end of every coordinate (at least one)",
        section="federation",
        low=0.0,
        below=0.5,
    )
    max_update_norm: float = setting(
        0.0,
        "longest move from the global model one site's update may make; a "
        "longer one is scaled down to it and recorded (0: the longest an honest "
        "DP-SGD update makes, from the learning rate, steps, clip norm and noise)",
        section="federation",
        low=0.0,
    )
    max_site_examples: int = setting(
        0,
        "largest record count a site's weight may claim (the consortium's "
        "declared maximum); a larger claim is capped and recorded (0: 10 x the "
        "round's median claim; under secure aggregation, 1,000,000)",
        section="federation",
        low=0,
    )
    secure_aggregation: bool = setting(
        False,
        "SecAgg+: the coordinator learns only the sum of the sites' "
        "bounded, weighted updates and of their weights, never one site's "
        "update (needs aggregation = mean)",
        section="federation",
        in_scenario=False,
    )
    initial_model: str = setting(
        "",
        "start round 1 from this model instead of random weights: a run's model "
        "folder (RUN_DIR/model) or a model.npz of pre-trained weights; the "
        "architecture must match",
        section="data",
    )
    server_eval_data: str = setting(
        "",
        "a DICOM folder or manifest the coordinator owns, evaluated after every round",
        section="federation",
        in_scenario=False,
    )
    federation_name: str = setting(
        "",
        "the federation this run belongs to; a site that names one in its own "
        "site.federation_name serves only that federation's runs",
        section="federation",
        in_scenario=False,
    )
    # filled in by fedmed
    run_dir: str = internal("", "the coordinator's run directory")
    run_id: str = internal("", "fedmed's run id; stays the same when a run is resumed")
    start_round: int = internal(1, "> 1 when resuming from the checkpoint of start_round - 1")
    run_signature: str = internal(
        "", "the coordinator's Ed25519 signature of every other setting (base64; see fedmed.run_signing)"
    )
    simulation_sites: str = internal(
        "", "simulation only: JSON list of each virtual site's node config, indexed by Flower's partition id"
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        if not 1 <= self.start_round <= self.rounds:
            raise ValueError(f"the start round must be within 1..{self.rounds}, got {self.start_round}")
        if not 2 <= len(self.class_names) <= MAX_CLASSES:
            raise ValueError(
                f"data.classes must name 2 to {MAX_CLASSES} classes, got {len(self.class_names)}: "
                f"{self.classes[:200]!r}"
            )
        for name in ("class_weights", "class_prior"):
            _check_per_class(name, getattr(self, name), self.class_names)
        if self.secure_aggregation and self.aggregation != "mean":
            raise ValueError(
                "secure aggregation sums the sites' updates, so the coordinator can only take their "
                f'mean: set federation.aggregation = "mean" (not {self.aggregation!r})'
            )

    def evaluates(self, model_round: int) -> bool:
        """Whether the global model after ``model_round`` (0: the initial one) is evaluated."""
        return model_round % self.evaluate_every == 0 or model_round == self.rounds

    def round_learning_rate(self, round_number: int) -> float:
        """The sites' step size in a round (1-based) under ``learning_rate_schedule``."""
        if self.learning_rate_schedule == "cosine":
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * (round_number - 1) / self.rounds))
        return self.learning_rate

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    @property
    def class_weight_values(self) -> tuple[float, ...] | None:
        return _per_class(self.class_weights)

    @property
    def class_prior_values(self) -> tuple[float, ...] | None:
        return _per_class(self.class_prior)

    def to_flower(self) -> dict:
        return to_flower(self)

    @classmethod
    def from_flower(cls, config: Mapping) -> RunSettings:
        return from_flower(cls, config, "the run config")

    def user_settings(self) -> dict:
        """The settings a user chose (no paths or ids), by name: for records and cards."""
        return {f.name: getattr(self, f.name) for f in options(RunSettings)}


@dataclass(frozen=True)
class SiteSettings:
    """A hospital's own settings: where its data and ledger are, and its privacy budget.
    They reach its ClientApp as the SuperNode's node config and never leave the site."""

    name: str = setting(
        "", "this hospital's name, as shown in reports", section="site", flag="site", required=True, in_scenario=False
    )
    data: str = setting(
        "",
        "folder with one sub-folder per class, or a CSV manifest (path,label[,patient_id])",
        section="site",
        required=True,
        in_scenario=False,
    )
    cache_dir: str = setting(
        "", "preprocessing cache (default: $FEDMED_CACHE_DIR or ~/.cache/fedmed)", section="site", in_scenario=False
    )
    max_file_mb: int = setting(
        512,
        "files larger than this are skipped unread (reason too-large), so a stray "
        "huge file cannot exhaust the site's memory; raise it for very large images",
        section="site",
        unit="MB",
        low=1,
        high=1_000_000,
    )
    allow_outside_paths: bool = setting(
        False,
        "let a CSV manifest name files outside its own folder (absolute "
        "paths, '..', links leading out); otherwise they are skipped as "
        "outside-site-folder",
        section="site",
    )
    coordinator_key: str = setting(
        "",
        "the coordinator's public signing key (coordinator.pub): this site serves "
        "only runs whose settings carry its signature (fedmed-client needs it unless "
        "--insecure)",
        section="site",
        in_scenario=False,
    )
    federation_name: str = setting(
        "",
        "serve only runs of this federation (the coordinator's "
        "federation.federation_name; empty: any run the coordinator signed)",
        section="site",
        in_scenario=False,
    )
    dp: bool = setting(True, "train with differential privacy; false only for non-private baselines", section="privacy")
    max_epsilon: float = setting(
        8.0,
        "the site's lifetime privacy budget; rounds that would pass it are refused",
        section="privacy",
        above=0.0,
        per_site=True,
    )
    target_epsilon: float = setting(
        0.0,
        "cumulative epsilon to reach by the end of this run (0: max_epsilon)",
        section="privacy",
        low=0.0,
        per_site=True,
    )
    max_epsilon_per_run: float = setting(
        0.0,
        "the most one run may spend, its own rounds and releases "
        "composed alone; rounds and releases past it are refused, and the noise "
        "is set so a run ends at or below it (0: half of max_epsilon, so a run, "
        "whoever starts it, takes at most half of the lifetime budget and the "
        "site can serve at least two)",
        section="privacy",
        low=0.0,
        per_site=True,
    )
    delta: float = setting(
        0.0, "delta of the guarantee (0: a power of ten below 1/(10 n))", section="privacy", low=0.0, below=1.0
    )
    privacy_unit: str = setting(
        "patient",
        "what one protected record is: 'patient' (patients are sampled and "
        "each patient's summed gradient is clipped; needs a PatientID on every training "
        "image, else image level with a warning) or 'image' (a patient with k images is "
        "protected by about k x epsilon)",
        section="privacy",
        choices=PRIVACY_UNITS,
        per_site=True,
    )
    release_share: float = setting(
        0.25,
        "share of the run's target epsilon, counted alone, for the DP releases "
        "besides the model: the site's record count once per run and its validation "
        "counts of each evaluated model (Gaussian noise, composed into the ledger)",
        section="privacy",
        above=0.0,
        below=1.0,
        per_site=True,
    )
    release_exact: str = setting(
        "",
        "statistics this site sends exactly, without DP, comma-separated from: "
        f"{', '.join(EXACT_RELEASES)}; each is recorded in the ledger as a non-private "
        "release and shown as a finding (empty: none)",
        section="privacy",
        per_site=True,
    )
    min_secure_threshold: float = setting(
        0.5,
        "secure aggregation: the site answers a round only if the "
        "coordinator's threshold (shares needed to unmask) is more than this "
        "fraction of the sites in the round's key list, and at least 2 (0.5: a "
        "strict majority, so no two disjoint groups of sites can each unmask)",
        section="privacy",
        low=0.5,
        below=1.0,
    )
    ledger: str = internal("", "the site's privacy ledger (fedmed-client keeps it in the state directory)")
    device: str = internal(
        "cpu",
        "where the site trains and validates: fedmed-client's resources.device, or a simulation's for its "
        "virtual sites, resolved (fedmed.device); never the coordinator's to choose",
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        check_device_name(self.device)
        unknown = sorted(set(self.exact_releases) - set(EXACT_RELEASES))
        if unknown:
            raise ValueError(
                f"privacy.release_exact names {', '.join(map(repr, unknown))}; it takes "
                f"comma-separated names from: {', '.join(EXACT_RELEASES)}"
            )

    @property
    def exact_releases(self) -> frozenset[str]:
        """The statistics this site sends without DP (``release_exact``)."""
        return exact_releases(self.release_exact)

    def to_flower(self) -> dict:
        return to_flower(self)

    @classmethod
    def from_flower(cls, config: Mapping) -> SiteSettings:
        missing = [name for name in ("name", "data", "ledger") if not config.get(name)]
        if missing:
            raise ValueError(f"the SuperNode's node config lacks {', '.join(missing)} (start sites with fedmed-client)")
        return from_flower(cls, config, "the node config")

    @property
    def cache_path(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None


@dataclass(frozen=True)
class PretrainSettings:
    """Non-private training on PUBLIC data (``fedmed pretrain``, a scenario's [pretrain]):
    the starting model a federation then fine-tunes privately. A site's data is never
    public data."""

    data: str = setting(
        "",
        "the public data: a MedMNIST-style .npz, a DICOM folder or manifest, or a folder "
        'of PNG/JPEG images by class (a scenario may say "synthetic": the generator\'s own '
        "public pool); empty: no pre-training",
        section="pretrain",
    )
    epochs: int = setting(
        5,
        "passes over the public training split (short pre-training transferred better than long in fedmed's probes)",
        section="pretrain",
        low=1,
        high=1000,
    )
    learning_rate: float = setting(
        0.05, "SGD step size, cosine-decayed over the epochs", section="pretrain", above=0.0, high=10.0
    )
    batch_size: int = setting(64, "images per step", section="pretrain", low=1, high=4096)
    val_fraction: float = setting(
        0.15, "share of the public patients kept to validate each epoch", section="pretrain", low=0.0, below=1.0
    )
    patience: int = setting(
        0,
        "stop after this many epochs without a better validation AUROC and keep the "
        "best epoch's weights (0: train every epoch, keep the last)",
        section="pretrain",
        low=0,
        high=1000,
    )
    augment: bool = setting(
        True,
        "random small shifts, rotations and contrast changes (no horizontal flips: "
        "chest X-rays are not left-right symmetric)",
        section="pretrain",
    )
    source_name: str = setting(
        "", "what the public data is, for the model card (e.g. its data set's name)", section="pretrain"
    )
    terms: str = setting("", "the public data's terms of use, for the model card", section="pretrain")
    citation: str = setting("", "how the public data asks to be cited, for the model card", section="pretrain")

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class ServerSettings:
    """How ``fedmed-server`` listens and whom it admits."""

    host: str = setting("0.0.0.0", "address to listen on (0.0.0.0: all)", section="server")
    port: int = setting(9092, "the one port hospitals connect to", section="server", low=1, high=65535)
    certificates: str = setting("", "folder with ca.crt, server.crt and server.key (TLS)", section="server")
    insecure: bool = setting(False, "no TLS: trusted test networks only", section="server")
    authorized_keys: str = setting(
        "", "folder of site public keys (*.pub): only these sites may join (needs TLS)", section="server"
    )
    signing_key: str = setting(
        "",
        "the coordinator's private signing key: every run's settings are signed with "
        "it, and sites that pinned its public key serve only signed runs (default: "
        "coordinator.key in the certificates folder, when present)",
        section="server",
    )

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class ClientSettings:
    """How ``fedmed-client`` reaches the coordinator and where it keeps its state."""

    server: str = setting("", "the coordinator, HOST:PORT", section="connection", required=True)
    root_certificates: str = setting("", "CA certificate that signed the coordinator's", section="connection")
    insecure: bool = setting(False, "no TLS: trusted test networks only", section="connection")
    auth_key: str = setting("", "this site's private key, if the coordinator requires site keys", section="connection")
    state_dir: str = setting(
        "", "where the site's privacy ledger and logs live (default ~/.fedmed/sites/SITE)", section="site"
    )

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class DeviceSettings:
    """Where this machine computes (``fedmed.device``): a hospital's training and
    validation, the coordinator's scoring of its held-out set, a simulation, ``fedmed
    pretrain`` and ``fedmed predict``. Each machine chooses its own; it is never part of
    the run's settings, so a coordinator cannot choose a site's."""

    device: str = setting(
        "auto",
        f"where to compute: {DEVICE_NAMES} (auto: CUDA when torch finds it, else the CPU); what leaves a "
        "site is the same either way",
        section="resources",
    )

    def __post_init__(self) -> None:
        check_ranges(self)
        check_device_name(self.device)


@dataclass(frozen=True)
class SimulationSettings:
    """A simulation's own settings: where its data comes from, how it is split over
    virtual hospitals, and the simulation's resources."""

    source: str = setting(
        "synthetic",
        "synthetic (built in), npz (MedMNIST-style file) or dicom (one folder per site)",
        section="data",
        choices=("synthetic", "npz", "dicom"),
    )
    path: str = setting("", "npz: the .npz file", section="data")
    site_dirs: tuple[str, ...] = setting((), "dicom: one DICOM folder (or manifest) per site", section="data")
    test_dir: str = setting("", "dicom: a held-out DICOM folder (npz uses its test split)", section="data")
    images: int = setting(1600, "synthetic: size of the image pool", section="data", low=1)
    test_fraction: float = setting(
        0.2, "synthetic: share of every site's patients held out for testing", section="data", above=0.0, below=1.0
    )
    sites: int = setting(4, "number of virtual hospitals (dicom: one per folder)", section="partition", low=1)
    alpha: float | None = setting(
        0.5, "Dirichlet label skew, smaller is more skewed (none: equal class mixes)", section="partition", above=0.0
    )
    quantity_alpha: float | None = setting(
        2.0,
        "Dirichlet site sizes, smaller is more unequal (none: equal expected sizes)",
        section="partition",
        above=0.0,
    )
    seed: int = setting(0, "seed of the data split over sites", section="partition", low=0)
    min_site_size: int = setting(20, "fewest images a site gets", section="partition", low=1)
    cpus_per_site: int = setting(1, "CPUs reserved per virtual site (Ray)", section="resources", low=1)
    gpus_per_site: float = setting(
        0.0,
        "GPUs reserved per virtual site (Ray), a share: 0.25 lets four sites train on one GPU at once; "
        "needs CUDA (0: the virtual sites train on CPUs, as Ray hides the GPUs from them)",
        section="resources",
        low=0.0,
    )
    ray_address: str = setting("", "attach to this Ray cluster instead of starting one", section="resources")

    @property
    def site_count(self) -> int:
        return len(self.site_dirs) if self.source == "dicom" else self.sites

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.source == "npz" and not self.path:
            raise ValueError('data.source = "npz" needs data.path (the .npz file)')
        if self.source == "dicom" and not self.site_dirs:
            raise ValueError('data.source = "dicom" needs data.site_dirs (one folder per site)')
        if self.source == "dicom" and not self.test_dir:
            raise ValueError('data.source = "dicom" needs data.test_dir (a held-out DICOM folder)')
