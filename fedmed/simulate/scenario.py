"""A simulation scenario: which data, how it is split over virtual hospitals, the model,
local training, each site's privacy settings and the resources of the simulation.

Scenarios are TOML files (see ``simulations/``) with the sections below; any value can be
overridden on the command line with ``--set section.key=value``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SECTIONS = {
    "data": ("source", "path", "site_dirs", "test_dir", "images", "image_size", "classes", "test_fraction"),
    "partition": ("sites", "alpha", "quantity_alpha", "seed", "min_site_size"),
    "model": ("depth", "width"),
    "training": ("rounds", "local_epochs", "batch_size", "learning_rate", "momentum", "max_grad_norm",
                 "class_weights", "server_learning_rate", "server_momentum"),
    "privacy": ("dp", "max_epsilon", "target_epsilon", "delta"),
    "resources": ("cpus_per_site", "ray_address"),
}
SOURCES = ("synthetic", "npz", "dicom")


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    description: str = ""
    # data
    source: str = "synthetic"  # synthetic | npz | dicom
    path: str = ""  # npz: the .npz file
    site_dirs: tuple[str, ...] = ()  # dicom: one DICOM folder (or manifest) per site
    test_dir: str = ""  # dicom: a held-out DICOM folder; npz uses its test split
    images: int = 1600  # synthetic pool size
    image_size: int = 28
    classes: str = "normal,pneumonia"
    test_fraction: float = 0.2  # synthetic: patients held out for the test set
    # partition
    sites: int = 4
    alpha: float | None = 0.5  # Dirichlet label skew; None: equal class mixes
    quantity_alpha: float | None = 2.0  # Dirichlet site sizes; None: equal expected sizes
    seed: int = 0
    min_site_size: int = 20
    # model and local training
    depth: int = 18
    width: int = 16
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 64
    learning_rate: float = 0.1
    momentum: float = 0.9
    max_grad_norm: float = 1.0
    class_weights: str = ""
    server_learning_rate: float = 1.0
    server_momentum: float = 0.0
    # privacy, per site: one value for all sites or a list with one value per site
    dp: bool = True
    max_epsilon: float | tuple[float, ...] = 8.0
    target_epsilon: float | tuple[float, ...] = 0.0  # 0: up to max_epsilon by the end of the run
    delta: float = 0.0  # 0: each site's default below 1/n
    # resources
    cpus_per_site: int = 1
    ray_address: str = ""  # attach to this Ray cluster instead of starting one
    scenario_file: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.source == "npz" and not self.path:
            raise ValueError("data.source = \"npz\" needs data.path (the .npz file)")
        if self.source == "dicom" and not self.site_dirs:
            raise ValueError("data.source = \"dicom\" needs data.site_dirs (one folder per site)")
        if self.source == "dicom" and not self.test_dir:
            raise ValueError("data.source = \"dicom\" needs data.test_dir (a held-out DICOM folder)")
        if self.sites < 1 or self.rounds < 1:
            raise ValueError(f"partition.sites and training.rounds must be >= 1, got {self.sites}, {self.rounds}")
        for name in ("max_epsilon", "target_epsilon"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != self.site_count:
                raise ValueError(f"privacy.{name} lists {len(value)} values for {self.site_count} sites")
        if any(self.per_site("max_epsilon", i) <= 0 for i in range(self.site_count)):
            raise ValueError(f"privacy.max_epsilon must be positive, got {self.max_epsilon}; it is each site's "
                             "budget, and the private centralized baseline's, also when privacy.dp = false")

    @property
    def site_count(self) -> int:
        return len(self.site_dirs) if self.source == "dicom" else self.sites

    def per_site(self, name: str, index: int) -> float:
        """A privacy setting of site ``index`` (lists give one value per site)."""
        value = getattr(self, name)
        return float(value[index]) if isinstance(value, tuple) else float(value)

    def to_dict(self) -> dict:
        return asdict(self)


def load_scenario(path: Path | None, overrides: list[str] = ()) -> Scenario:
    """A scenario from its TOML file (or the defaults), with ``section.key=value`` overrides."""
    values: dict = {}
    if path is not None:
        try:
            document = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"cannot read scenario {path}: {error}") from error
        values = _flatten(document, str(path))
        values["scenario_file"] = str(Path(path).resolve())
        values.setdefault("name", Path(path).stem)
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"--set expects section.key=value, got {override!r}")
        section, _, name = key.strip().partition(".")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word is a string
        values.update(_flatten({section: {name: value}} if name else {section: value}, "--set"))
    return _build(values)


def _flatten(document: dict, origin: str) -> dict:
    known = {f.name for f in fields(Scenario)}
    values = {}
    for key, value in document.items():
        key = key.replace("-", "_")
        if isinstance(value, dict):
            allowed = SECTIONS.get(key)
            if allowed is None:
                raise ValueError(f"{origin}: unknown section [{key}]; known: {', '.join(SECTIONS)}")
            for name, item in value.items():
                name = name.replace("-", "_")
                if name not in allowed:
                    raise ValueError(f"{origin}: unknown setting {key}.{name}; known: {', '.join(allowed)}")
                values[name] = item
        elif key in ("name", "description"):
            values[key] = value
        elif key in known:
            raise ValueError(f"{origin}: {key} belongs in a section (e.g. [{_section_of(key)}])")
        else:
            raise ValueError(f"{origin}: unknown setting {key!r}")
    return values


def _section_of(name: str) -> str:
    return next(section for section, names in SECTIONS.items() if name in names)


def _build(values: dict) -> Scenario:
    for name in ("alpha", "quantity_alpha"):
        if isinstance(values.get(name), str) and values[name].lower() == "none":
            values[name] = None
    for name in ("site_dirs", "max_epsilon", "target_epsilon"):
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    defaults = Scenario()
    for name, value in values.items():
        default = getattr(defaults, name, None)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{_label(name)} must be true or false, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool) and not isinstance(value, int):
            raise ValueError(f"{_label(name)} must be a whole number, got {value!r}")
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif isinstance(default, float) and not isinstance(value, (float, tuple)) and value is not None:
            raise ValueError(f"{_label(name)} must be a number, got {value!r}")
    return replace(defaults, **values)


def _label(name: str) -> str:
    return f"{_section_of(name)}.{name}" if any(name in n for n in SECTIONS.values()) else name
