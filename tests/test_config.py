"""One declaration of every setting (fedmed/config/), and every way a value reaches the
site: command-line options, scenario keys, config files and Flower's run and node config.

The tests enumerate the declared fields, so a setting added without wiring fails them."""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys
import tempfile
import typing
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import tomli_w
import torch
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from fedmed.cli import client as client_cli
from fedmed.cli import server as server_cli
from fedmed.config import ClientSettings, RunSettings, ServerSettings, SimulationSettings, SiteSettings
from fedmed.config.command_line import load_settings
from fedmed.config.fields import build, flag, key, options
from fedmed.deploy.launch import write_app, write_node_config
from fedmed.deploy.site import site_settings
from fedmed.flower.secagg_site import ProtocolError, check_threshold
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.budget import PrivacyConfig
from fedmed.simulate.federated import run_settings
from fedmed.simulate.federated import site_settings as simulated_sites
from fedmed.simulate.scenario import load_scenario
from fedmed.simulate.sites import SimulationData
from fedmed.train import TrainConfig
from fedmed.weights import model_state
from tests.federation_helpers import BIN, process_env

REPO = Path(__file__).resolve().parent.parent

# Where each run setting is used. A new setting must be placed here, or these tests fail.
INTO_TRAIN = {"local_epochs": "epochs", "batch_size": "batch_size", "physical_batch_size": "physical_batch_size",
              "learning_rate": "learning_rate", "momentum": "momentum", "weight_decay": "weight_decay",
              "class_weights": "class_weights", "class_prior": "class_prior", "local_steps": "steps", "seed": "seed"}
ROUND_SCHEDULE = {"learning_rate_schedule"}  # changes the sites' learning rate from round to round
INTO_PRIVACY = {"max_grad_norm": "max_grad_norm", "rounds": "planned_rounds", "dp": "dp",
                "max_epsilon": "max_epsilon", "target_epsilon": "target_epsilon", "delta": "delta",
                "privacy_unit": "privacy_unit", "release_share": "release_share", "release_exact": "release_exact",
                "max_epsilon_per_run": "max_epsilon_per_run", "clip_quantile": "clip_quantile",
                "clip_learning_rate": "clip_learning_rate"}
INTO_MODEL = {"depth": "depth", "width": "width", "frontend": "frontend", "image_size": "image_size",
              "classes": "num_classes"}
SITE_SPLIT = {"classes", "image_size", "val_fraction", "seed"}  # the site's data and its validation split
COORDINATOR = {"server_learning_rate", "server_momentum", "min_sites", "fraction_train", "round_timeout",
               "site_wait_timeout", "server_eval_data", "initial_model", "aggregation", "trim_fraction",
               "max_update_norm", "max_site_examples", "secure_aggregation"}
SITE_IDENTITY = {"name", "data", "cache_dir"}
EVALUATION = {"evaluate_every"}  # which rounds' models the sites and the coordinator evaluate
SECURE_AGGREGATION = {"min_secure_threshold"}  # a site's check of the coordinator's threshold (secagg_site)
RUN_ADMISSION = {"coordinator_key", "federation_name"}  # which runs a site serves (fedmed.run_signing)
SITE_FILES = {"max_file_mb", "allow_outside_paths"}  # which of its files a site reads (fedmed.data.site)
# What sizes a site's work, chosen by the coordinator: each has an upper bound (data.image_size's is older).
SITE_WORK_BOUNDS = {"width": "in [8, 256], a multiple of 8", "rounds": "in [1, 10000]",
                    "local_epochs": "in [1, 100]", "local_steps": "in [0, 10000]", "batch_size": "in [1, 65536]",
                    "physical_batch_size": "in [1, 4096]"}

TEXT_VALUES = {"classes": "normal,pneumonia,effusion", "class_weights": "2.0,0.5", "class_prior": "0.3,0.7",
               "source": "npz", "release_exact": "loss,timing"}
COMPANIONS = {"source": {"path": "/data/pneumoniamnist.npz"}}  # what a value needs beside it to be valid


@functools.cache
def initial_model_file() -> str:
    """Weights of the default architecture: a valid ``initial_model`` value (it is checked)."""
    path = Path(tempfile.mkdtemp(prefix="fedmed-initial-")) / "model.npz"
    np.savez(path, **model_state(build_model(ModelConfig.from_settings(RunSettings()))))
    return str(path)


def other_value(cls: type, f):
    """A valid value of the setting that differs from its default."""
    if f.name == "initial_model":
        return initial_model_file()
    if f.name in TEXT_VALUES:
        return TEXT_VALUES[f.name]
    meta = f.metadata
    kind = typing.get_type_hints(cls)[f.name]
    if type(None) in typing.get_args(kind):
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != f.default)
    if kind is bool:
        return not f.default
    if kind is int:
        value = f.default + 3 * (meta["multiple_of"] or 1)
        return value if meta["high"] is None or value <= meta["high"] else meta["high"] - 1
    if kind is float:
        high = meta["high"] if meta["high"] is not None else meta["below"]
        if high is not None:
            low = meta["low"] if meta["low"] is not None else meta["above"] or 0.0
            return round(low + 0.37 * (high - low), 4)
        return (f.default or 1.0) * 1.5 + 0.25
    if kind is str:
        return f"/srv/fedmed-test/{f.name}"
    if typing.get_origin(kind) is tuple:
        return ("/srv/fedmed-test/a", "/srv/fedmed-test/b")
    raise AssertionError(f"no test value for {key(f)} of type {kind}")


def command_line(f, value) -> list[str]:
    if isinstance(value, bool):
        return [flag(f) if value else "--no-" + flag(f)[2:]]
    if isinstance(value, tuple):
        return [flag(f), *value]
    return [flag(f), str(value)]


def toml_value(value) -> str:
    return tomli_w.dumps({"v": list(value) if isinstance(value, tuple) else value}).split("=", 1)[1].strip()


def at_the_site(run: RunSettings, tmp: Path) -> RunSettings:
    """``run`` as a site's ClientApp reads it: the app spec Flower is handed, read by Flower."""
    app = write_app(tmp / "app", run)
    return RunSettings.from_flower(get_fused_config_from_dir(app, {}))


def site_at_the_site(site: SiteSettings, tmp: Path) -> SiteSettings:
    """``site`` as its ClientApp reads it: the node config file, read by Flower's parser."""
    path = write_node_config(tmp / "node-config.toml", site.to_flower())
    return SiteSettings.from_flower(parse_config_args([str(path)]))


def check_run_value(site_run: RunSettings, name: str, value) -> None:
    assert getattr(site_run, name) == value
    if name in INTO_TRAIN:
        expected = {"class_weights": site_run.class_weight_values,
                    "class_prior": site_run.class_prior_values}.get(name, value)
        assert getattr(TrainConfig.from_settings(site_run), INTO_TRAIN[name]) == expected
    if name in ROUND_SCHEDULE:
        rates = [TrainConfig.from_settings(site_run, r).learning_rate for r in range(1, site_run.rounds + 1)]
        assert rates[0] == site_run.learning_rate and rates == sorted(rates, reverse=True) and len(set(rates)) > 1
    if name in EVALUATION:
        assert [r for r in range(site_run.rounds + 1) if site_run.evaluates(r)] == [0, site_run.rounds]
    if name in INTO_PRIVACY:
        assert getattr(PrivacyConfig.from_settings(SiteSettings(), site_run), INTO_PRIVACY[name]) == value
    if name in INTO_MODEL:
        expected = len(value.split(",")) if name == "classes" else value
        assert getattr(ModelConfig.from_settings(site_run), INTO_MODEL[name]) == expected


def check_site_value(site: SiteSettings, name: str, value) -> None:
    assert getattr(site, name) == value
    if name in INTO_PRIVACY:
        assert getattr(PrivacyConfig.from_settings(site, RunSettings()), INTO_PRIVACY[name]) == value
    if name in SECURE_AGGREGATION:  # the site's minimum is what its check holds a threshold to
        check_threshold(math.floor(value * 10) + 1, 10, site.min_secure_threshold)
        with pytest.raises(ProtocolError, match=f"min_secure_threshold = {value:g}"):
            check_threshold(math.floor(value * 10), 10, site.min_secure_threshold)


def test_every_run_and_site_setting_has_a_home():
    placed = (set(INTO_TRAIN) | ROUND_SCHEDULE | set(INTO_PRIVACY) | set(INTO_MODEL) | SITE_SPLIT | COORDINATOR
              | SITE_IDENTITY | EVALUATION | SECURE_AGGREGATION | RUN_ADMISSION | SITE_FILES)
    for cls in (RunSettings, SiteSettings):
        unplaced = [key(f) for f in options(cls) if f.name not in placed]
        assert not unplaced, f"settings with no known use at the site or coordinator: {unplaced}"


@pytest.mark.parametrize("f", options(RunSettings), ids=key)
def test_a_run_setting_given_to_fedmed_server_reaches_the_site(f, tmp_path):
    value = other_value(RunSettings, f)
    args = server_cli.build_parser().parse_args(["--insecure", *command_line(f, value)])
    run = load_settings(args, server_cli.PARTS, None)["run"]
    check_run_value(at_the_site(run, tmp_path), f.name, value)


def four_sites(tmp: Path) -> SimulationData:
    return SimulationData(("a", "b", "c", "d"), tuple(tmp / n for n in "abcd"), tmp / "test", "")


def simulated_run(f, value, tmp: Path) -> RunSettings | None:
    """The run a simulation of a scenario setting ``f`` to ``value`` sends its virtual
    sites, as they read it; None for what a simulation sets itself (after checking that
    the scenario refuses it)."""
    override = f"{key(f)}={toml_value(value)}"
    if not f.metadata["in_scenario"]:
        with pytest.raises(ValueError, match=f"{key(f)} is not a scenario setting: a simulation sets it"):
            load_scenario(None, [override])
        return None
    run = run_settings(load_scenario(None, [override]), four_sites(tmp), tmp / "run", tmp / "cache")
    return at_the_site(run, tmp)


@pytest.mark.parametrize("f", options(RunSettings), ids=key)
def test_a_run_setting_in_a_scenario_reaches_the_virtual_sites(f, tmp_path):
    value = other_value(RunSettings, f)
    run = simulated_run(f, value, tmp_path)
    if run is not None:
        check_run_value(run, f.name, value)


@pytest.mark.parametrize("f", options(SiteSettings), ids=key)
def test_a_site_setting_given_to_fedmed_client_reaches_its_clientapp(f, tmp_path):
    value = other_value(SiteSettings, f)
    required = {"name": ["--site", "st-mary"], "data": ["--data", "/srv/fedmed-test/images"]}
    base = ["--server", "coordinator:9092", "--insecure"] + [a for n, a in required.items() if n != f.name for a in a]
    args = client_cli.build_parser().parse_args([*base, *command_line(f, value)])
    settings = load_settings(args, client_cli.PARTS, None, client_cli.ONLY)
    site = site_settings(settings["site"], settings["client"])
    check_site_value(site_at_the_site(site, tmp_path), f.name, value)


@pytest.mark.parametrize("f", options(SiteSettings), ids=key)
def test_a_site_setting_in_a_scenario_reaches_each_virtual_site(f, tmp_path):
    value = other_value(SiteSettings, f)
    run = simulated_run(f, value, tmp_path)
    if run is None:
        return
    sites = [SiteSettings.from_flower(s) for s in json.loads(run.simulation_sites)]
    assert len(sites) == 4
    for site in sites:
        check_site_value(site, f.name, value)


@pytest.mark.parametrize("f", options(SimulationSettings), ids=key)
def test_a_simulation_setting_is_a_scenario_key(f):
    value = other_value(SimulationSettings, f)
    overrides = [f"{key(f)}={toml_value(value)}"]
    overrides += [f"data.{k}={toml_value(v)}" for k, v in COMPANIONS.get(f.name, {}).items()]
    assert getattr(load_scenario(None, overrides).simulation, f.name) == value


@pytest.mark.parametrize("cls, cli, f", [(ServerSettings, server_cli, f) for f in options(ServerSettings)]
                         + [(ClientSettings, client_cli, f) for f in options(ClientSettings)],
                         ids=lambda p: key(p) if hasattr(p, "metadata") else "")
def test_a_deployment_setting_is_an_option_and_a_config_file_key(cls, cli, f, tmp_path):
    value = other_value(cls, f)
    required = ["--site", "st-mary", "--data", "/srv/images"] if cli is client_cli else []
    if cli is client_cli and f.name != "server":
        required += ["--server", "coordinator:9092"]
    part = next(name for name, c in cli.PARTS.items() if c is cls)
    args = cli.build_parser().parse_args([*required, *command_line(f, value)])
    assert getattr(load_settings(args, cli.PARTS, None, getattr(cli, "ONLY", None))[part], f.name) == value
    config = tmp_path / "deployment.toml"
    config.write_text(tomli_w.dumps({f.metadata["section"]: {f.name: value}}))
    args = cli.build_parser().parse_args([*required, "--config", str(config)])
    assert getattr(load_settings(args, cli.PARTS, config, getattr(cli, "ONLY", None))[part], f.name) == value


def test_settings_survive_the_trip_through_flower_unchanged(tmp_path):
    changed = {f.name: other_value(RunSettings, f) for f in options(RunSettings)} | {
        "class_weights": "2,0.5,1", "class_prior": "0.5,0.3,0.2", "aggregation": "mean"}  # secure: mean only
    run = RunSettings(**changed, run_dir=str(tmp_path), run_id="run-1234", start_round=2,
                      simulation_sites=json.dumps([{"name": 'site "one"', "data": "/d"}]))
    assert at_the_site(run, tmp_path) == run
    site = SiteSettings(**{f.name: other_value(SiteSettings, f) for f in options(SiteSettings)},
                        ledger="/srv/ledger.jsonl")
    assert site_at_the_site(site, tmp_path) == site
    with pytest.raises(ValueError, match="unknown setting 'learning-rat'; did you mean learning_rate"):
        RunSettings.from_flower({**run.to_flower(), "learning-rat": 0.1})


@pytest.mark.slow
def test_a_config_file_with_an_unknown_or_out_of_range_key_is_refused_by_name(tmp_path):
    config = tmp_path / "coordinator.toml"
    config.write_text("[training]\nlerning_rate = 0.05\n")
    result = subprocess.run([str(BIN / "fedmed-server"), "--insecure", "--config", str(config), "--run-dir",
                             str(tmp_path / "run")], capture_output=True, text=True, env=process_env(tmp_path),
                            timeout=120)
    assert result.returncode == 2
    assert str(config) in result.stderr and "training.lerning_rate = 0.05" in result.stderr
    assert "did you mean training.learning_rate" in result.stderr
    config.write_text("[training]\nrounds = 0\n")
    result = subprocess.run([str(BIN / "fedmed-server"), "--insecure", "--config", str(config), "--run-dir",
                             str(tmp_path / "run")], capture_output=True, text=True, env=process_env(tmp_path),
                            timeout=120)
    assert result.returncode == 2 and str(config) in result.stderr
    assert "training.rounds must be in [1, 10000], got 0" in result.stderr
    with pytest.raises(ValueError, match="model.width must be a multiple of 8, got 12"):
        RunSettings(width=12)
    assert not (tmp_path / "run").exists(), "nothing is written for a refused configuration"
    site = tmp_path / "site.toml"
    site.write_text("[privacy]\nmax_epsilon = -1.0\n")
    result = subprocess.run([str(BIN / "fedmed-client"), "--config", str(site), "--site", "a", "--data",
                             str(tmp_path), "--server", "x:1", "--insecure"], capture_output=True, text=True,
                            env=process_env(tmp_path), timeout=120)
    assert result.returncode == 2 and str(site) in result.stderr
    assert "privacy.max_epsilon must be positive (> 0), got -1.0" in result.stderr
    with pytest.raises(ValueError, match=r"sim.toml: unknown section \[privcy\].*did you mean privacy"):
        (tmp_path / "sim.toml").write_text("[privcy]\ndp = false\n")
        load_scenario(tmp_path / "sim.toml")


@pytest.mark.parametrize("name", sorted(SITE_WORK_BOUNDS))
def test_a_setting_that_sizes_a_site_s_work_is_refused_above_its_bound_by_name(name):
    """A site takes these from the coordinator's run config: a refused value names the
    setting and its bound, wherever it comes from."""
    f = next(f for f in options(RunSettings) if f.name == name)
    huge = {"width": 2**20, "rounds": 10**7}.get(name, 10**9)
    refusal = re.escape(f"{key(f)} must be {SITE_WORK_BOUNDS[name]}, got {huge}")
    with pytest.raises(ValueError, match=refusal):
        RunSettings(**{name: huge})
    with pytest.raises(ValueError, match=f"the run config: {refusal}"):
        RunSettings.from_flower({**RunSettings().to_flower(), name.replace("_", "-"): huge})
    assert getattr(RunSettings(**{name: f.metadata["high"]}), name) == f.metadata["high"]


def test_a_run_names_at_most_a_thousand_classes():
    with pytest.raises(ValueError, match="data.classes must name 2 to 1000 classes, got 1001"):
        RunSettings(classes=",".join(f"c{i}" for i in range(1001)))


def test_options_on_the_command_line_win_over_the_config_file(tmp_path):
    args = server_cli.build_parser().parse_args(["--config", str(REPO / "server" / "coordinator.toml"),
                                                 "--rounds", "4", "--no-insecure"])
    settings = load_settings(args, server_cli.PARTS, args.config)
    assert settings["run"].rounds == 4, "the option"
    assert settings["run"].min_sites == 3 and settings["server"].certificates == "certs", "the file"
    assert settings["run"].momentum == RunSettings().momentum, "the default"


def test_the_kits_config_files_load():
    args = client_cli.build_parser().parse_args(["--config", str(REPO / "client" / "site.toml")])
    site = load_settings(args, client_cli.PARTS, args.config, client_cli.ONLY)
    assert site["site"].name == "st-mary" and site["site"].max_epsilon == 8.0
    assert site["client"].server == "coordinator.example.org:9092" and site["data"].image_size == 28
    assert not (REPO / "server" / "server.args").exists() and not (REPO / "client" / "client.args").exists()
    for readme, config in (("server", "coordinator.toml"), ("client", "site.toml")):
        assert f"--config {readme}/{config}" in (REPO / readme / "README.md").read_text()


def test_the_64px_scenario_trains_at_64px_with_the_rules_scattering_scales():
    """simulations/synthetic-5-sites-64px.toml: synthetic sites and the NIH set at 64 px, and
    a model whose scattering front-end takes J=3 (an 8 x 8 map of 217 channels)."""
    scenario = load_scenario(REPO / "simulations" / "synthetic-5-sites-64px.toml")
    assert scenario.run.image_size == 64 and scenario.simulation.source == "synthetic"
    assert scenario.simulation.sites == 5 and scenario.pretrain.data.endswith("nih-cxr-public-64.npz")
    config = ModelConfig.from_settings(scenario.run)
    assert config.frontend == "scattering" and config.scattering_scales == 3
    with torch.device("meta"):
        model = build_model(config)
    assert model.conv1.in_channels == 217 and model.frontend.norm.num_groups == 31


def test_every_declared_field_is_described_and_reachable():
    for cls in (RunSettings, SiteSettings, ServerSettings, ClientSettings, SimulationSettings):
        for f in fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
    server_help = server_cli.build_parser().format_help()
    assert all(flag(f) in server_help for f in options(RunSettings) + options(ServerSettings))
    client_help = client_cli.build_parser().format_help()
    assert all(flag(f) in client_help for f in options(SiteSettings) + options(ClientSettings))


def test_importing_the_configuration_loads_no_torch_or_flower():
    code = ("import sys, fedmed.config, fedmed.simulate.scenario; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'torchvision', 'opacus', 'flwr'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_simulation_sets_the_federation_itself(tmp_path):
    scenario = load_scenario(None, ["privacy.max_epsilon=[8.0, 4.0, 8.0, 2.0]"])
    data = four_sites(tmp_path)
    run = run_settings(scenario, data, tmp_path / "run", tmp_path / "cache")
    assert run.min_sites == 4 and run.server_eval_data == str(tmp_path / "test")
    sites = simulated_sites(scenario, data, tmp_path / "state", tmp_path / "cache")
    assert [s.max_epsilon for s in sites] == [8.0, 4.0, 8.0, 2.0]
    assert [s.name for s in sites] == ["a", "b", "c", "d"]
    assert replace(sites[0], name="x").ledger == str(tmp_path / "state" / "a" / "ledger.jsonl")


def test_list_settings_are_toml_arrays_and_the_old_comma_form_still_reads_with_a_note(tmp_path):
    from fedmed.config.files import route

    parts = {"run": RunSettings}
    arrays = route({"data": {"classes": ["normal", "pneumonia"]},
                    "training": {"class_prior": [0.26, 0.74], "class_weights": [2.85, 1]}}, parts, "new.toml")
    run = build(RunSettings, arrays["run"])
    assert run.class_names == ("normal", "pneumonia")
    assert run.class_prior_values == (0.26, 0.74) and run.class_weight_values == (2.85, 1.0)
    with pytest.warns(FutureWarning, match=r"old.toml: training.class_prior = '0.26,0.74' is the old "
                                           r"comma-separated form; write a TOML array, "
                                           r"training.class_prior = \[0.26, 0.74\]"):
        old = route({"training": {"class_prior": "0.26,0.74"}}, parts, "old.toml")
    assert build(RunSettings, old["run"]).class_prior_values == (0.26, 0.74)
    with pytest.raises(ValueError, match=r"training.class_weights must be a list of numbers, got \['2', 1\]"):
        build(RunSettings, route({"training": {"class_weights": ["2", 1]}}, parts, "bad.toml")["run"])


def test_the_shipped_files_use_arrays_for_list_settings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the comma form would warn
        for path in sorted((REPO / "simulations").glob("*.toml")):
            assert load_scenario(path, ["data.path=/somewhere/data.npz"]).run.class_names, path
        for cli, config in ((server_cli, REPO / "server" / "coordinator.toml"), (client_cli, REPO / "client" / "site.toml")):
            args = cli.build_parser().parse_args(["--config", str(config)])
            settings = load_settings(args, cli.PARTS, args.config, getattr(cli, "ONLY", None))
            run = settings.get("run") or settings["data"]  # the site reads the run's classes as [data]
            assert run.class_names == ("normal", "pneumonia"), config
