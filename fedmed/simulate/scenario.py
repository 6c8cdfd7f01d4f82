"""A simulation scenario: which data, how it is split over virtual hospitals, the run's
model and training, each site's privacy settings and the simulation's resources.

Scenarios are TOML files (see ``simulations/``) whose sections and keys are the settings
declared in ``fedmed.config``; any value can be overridden on the command line with
``--set section.key=value``. Privacy settings marked per-site take one value for every
site or a list with one value per site.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmed.config import DeviceSettings, PretrainSettings, RunSettings, SimulationSettings, SiteSettings
from fedmed.config.fields import build, coerce, options
from fedmed.config.files import parse_override, read_toml, route

PARTS = {
    "simulation": SimulationSettings,
    "device": DeviceSettings,  # [resources] device, listed beside the simulation's other resources
    "run": RunSettings,
    "site": SiteSettings,
    "pretrain": PretrainSettings,
}
TOP_LEVEL = ("name", "description")


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    description: str = ""
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    run: RunSettings = field(default_factory=RunSettings)
    # Each virtual site's privacy settings (name, data and ledger are filled in per site).
    site_settings: tuple[SiteSettings, ...] = ()
    # Public pre-training before the federation and the baselines (pretrain.data empty: none).
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    # Where the simulation computes ([resources] device): see simulation_device.
    device: DeviceSettings = field(default_factory=DeviceSettings)
    scenario_file: str = field(default="", compare=False)

    @property
    def site_count(self) -> int:
        return self.simulation.site_count

    def to_dict(self) -> dict:
        return asdict(self)


def load_scenario(path: Path | None, overrides: Sequence[str] = ()) -> Scenario:
    """A scenario from its TOML file (or the defaults), with ``section.key=value`` overrides."""
    documents = []
    if path is not None:
        documents.append((read_toml(Path(path)), str(path)))
    documents += [(parse_override(text), "--set") for text in overrides]
    values: dict[str, dict] = {part: {} for part in (*PARTS, "")}
    for document, origin in documents:
        for part, routed in route(document, PARTS, origin, top_level=TOP_LEVEL, scenario=True).items():
            values[part].update(routed)
    simulation = build(SimulationSettings, values["simulation"])
    run = build(RunSettings, values["run"])
    top = values[""]
    return Scenario(
        name=str(top.get("name") or (Path(path).stem if path is not None else "scenario")),
        description=str(top.get("description", "")),
        simulation=simulation,
        run=run,
        pretrain=build(PretrainSettings, values["pretrain"]),
        device=build(DeviceSettings, values["device"]),
        site_settings=_per_site(values["site"], simulation.site_count),
        scenario_file=str(Path(path).resolve()) if path is not None else "",
    )


def _per_site(values: dict, count: int) -> tuple[SiteSettings, ...]:
    """One SiteSettings per site from privacy values, each a value or a list of one per site."""
    per_site = {f.name for f in options(SiteSettings) if f.metadata.get("per_site")}
    for name, value in values.items():
        if isinstance(value, list):
            if name not in per_site:
                raise ValueError(f"privacy.{name} takes one value for all sites, got {value!r}")
            if len(value) != count:
                raise ValueError(f"privacy.{name} lists {len(value)} values for {count} sites")
    sites = []
    for index in range(count):
        chosen = {name: value[index] if isinstance(value, list) else value for name, value in values.items()}
        sites.append(SiteSettings(**{name: coerce(SiteSettings, name, value) for name, value in chosen.items()}))
    return tuple(sites)


def simulation_device(scenario: Scenario) -> str:
    """Where the simulation computes, resolved; raises ValueError naming the setting to
    change. One device serves the virtual sites, the coordinator's held-out scoring, the
    baselines and the public pre-training, so that every row of the comparison is
    computed alike.

    The virtual sites are Ray actors: Ray hides the GPUs from an actor that reserves none
    (``CUDA_VISIBLE_DEVICES`` empty) and shows one that reserves a share only its own GPU,
    as cuda:0. So CUDA needs ``resources.gpus_per_site > 0``, "auto" means CUDA only
    then, and a GPU is never named by its number here. Checked when the simulation
    starts, before any site does (torch is loaded only now)."""
    from fedmed.device import resolve_device

    gpus, name = scenario.simulation.gpus_per_site, scenario.device.device
    if gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(
                f"resources.gpus_per_site = {gpus:g} reserves GPUs for the virtual sites, but torch finds no "
                "CUDA device on this machine; set resources.gpus_per_site = 0"
            )
    device = resolve_device(name)
    if device.type == "cpu":
        if gpus > 0:
            raise ValueError(
                f'resources.gpus_per_site = {gpus:g} reserves GPUs that resources.device = "{name}" leaves '
                'idle; set resources.gpus_per_site = 0, or resources.device = "cuda"'
            )
        return "cpu"
    if gpus == 0:
        if name == "auto":
            return "cpu"
        raise ValueError(
            f'resources.device = "{name}" needs resources.gpus_per_site > 0 in a simulation: Ray hides the '
            "GPUs from virtual sites that reserve none; set resources.gpus_per_site (e.g. 0.25: four sites "
            'share a GPU) or resources.device = "cpu"'
        )
    if device.index is not None:
        raise ValueError(
            f'resources.device = "{name}": in a simulation Ray gives each virtual site its own GPU; set '
            'resources.device = "cuda"'
        )
    return "cuda"
