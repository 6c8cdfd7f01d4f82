"""Settings of a federated run (shared by coordinator and sites) and of one site.

The run's settings travel as Flower's run config (keys with dashes); a site's own
settings come from its SuperNode's node config and never leave the site.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedmed.model import ModelConfig
from fedmed.privacy.budget import PrivacyConfig
from fedmed.train import TrainConfig


def _parse(cls, values: dict, what: str):
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ValueError(f"unknown {what} setting {key!r}; known: {', '.join(sorted(k.replace('_', '-') for k in known))}")
        kwargs[name] = value
    return cls(**kwargs)


def _dashed(settings) -> dict:
    """A settings dataclass as Flower config keys (dashes instead of underscores)."""
    return {k.replace("_", "-"): v for k, v in asdict(settings).items()}


@dataclass(frozen=True)
class RunSettings:
    """What every party of one run agrees on: rounds, model, local training."""

    run_dir: str = ""  # the coordinator's run directory
    run_id: str = ""  # fedmed's run id; stays the same when a run is resumed
    rounds: int = 3
    start_round: int = 1  # > 1 when resuming from the checkpoint of start_round - 1
    min_sites: int = 2
    fraction_train: float = 1.0
    round_timeout: float = 600.0  # seconds to wait for the sites' replies
    site_wait_timeout: float = 600.0  # seconds to wait for min_sites to connect
    classes: str = "normal,pneumonia"
    image_size: int = 28
    model_depth: int = 18
    model_width: int = 16
    local_epochs: int = 1
    batch_size: int = 64
    physical_batch_size: int = 64
    learning_rate: float = 0.1
    momentum: float = 0.9
    server_learning_rate: float = 1.0  # 1.0 with server_momentum 0.0 is plain FedAvg
    server_momentum: float = 0.0  # FedAvgM when > 0
    max_grad_norm: float = 1.0
    class_weights: str = ""  # comma-separated, from public or coordinator figures
    val_fraction: float = 0.2
    server_eval_data: str = ""  # a DICOM folder or manifest the coordinator owns
    seed: int = 0
    # Simulation only: JSON list of each virtual site's settings (as a SuperNode's node
    # config), indexed by Flower's partition id. Empty in real deployments.
    simulation_sites: str = ""

    def __post_init__(self) -> None:
        if self.rounds < 1 or not 1 <= self.start_round <= self.rounds:
            raise ValueError(f"rounds must be >= 1 and start round within 1..rounds, got "
                             f"rounds={self.rounds}, start_round={self.start_round}")
        if self.min_sites < 1:
            raise ValueError(f"min_sites must be at least 1, got {self.min_sites}")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"fraction_train must be in (0, 1], got {self.fraction_train}")
        if self.server_learning_rate <= 0 or not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_learning_rate must be > 0 and server_momentum in [0, 1), got "
                             f"{self.server_learning_rate} and {self.server_momentum}")
        self.model_config()  # validates depth and width

    @classmethod
    def from_run_config(cls, config: dict) -> RunSettings:
        return _parse(cls, dict(config), "run")

    def to_run_config(self) -> dict:
        return _dashed(self)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.strip() for c in self.classes.split(",") if c.strip())

    def model_config(self) -> ModelConfig:
        return ModelConfig(depth=self.model_depth, width=self.model_width,
                           num_classes=len(self.class_names), image_size=self.image_size)

    def train_config(self) -> TrainConfig:
        weights = tuple(float(w) for w in self.class_weights.split(",")) if self.class_weights else None
        return TrainConfig(epochs=self.local_epochs, batch_size=self.batch_size,
                           physical_batch_size=self.physical_batch_size, learning_rate=self.learning_rate,
                           momentum=self.momentum, class_weights=weights, seed=self.seed)


@dataclass(frozen=True)
class SiteSettings:
    """A hospital's own settings: where its data and ledger are, and its privacy budget."""

    data: str
    site: str
    ledger: str
    cache_dir: str = ""
    max_epsilon: float = 8.0
    target_epsilon: float = 0.0  # 0: spend up to max_epsilon by the end of this run
    delta: float = 0.0  # 0: below 1/n for the site's n
    dp: bool = True  # false only for non-private baselines
    worker: str = ""  # socket of the site's long-lived worker (set by fedmed-client)

    def to_node_config(self) -> dict:
        """The settings as a SuperNode's node config (keys with dashes)."""
        return _dashed(self)

    @classmethod
    def from_node_config(cls, config: dict) -> SiteSettings:
        missing = [k for k in ("data", "site", "ledger") if k not in config]
        if missing:
            raise ValueError(f"the SuperNode's node config lacks {', '.join(missing)} "
                             "(start sites with fedmed-client)")
        return _parse(cls, dict(config), "site")

    def privacy_config(self, planned_rounds: int, max_grad_norm: float) -> PrivacyConfig:
        return PrivacyConfig(
            dp=self.dp,
            target_epsilon=self.target_epsilon or self.max_epsilon,
            max_epsilon=self.max_epsilon if self.dp else None,
            delta=self.delta or None,
            max_grad_norm=max_grad_norm,
            planned_rounds=planned_rounds,
        )

    @property
    def cache_path(self) -> Path | None:
        return Path(self.cache_dir) if self.cache_dir else None
