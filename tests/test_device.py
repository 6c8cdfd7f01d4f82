"""``resources.device``: names checked and refused by the setting's name when a command starts,
each machine choosing its own (never the coordinator for a site), the CPU computing exactly
what it computed before the setting existed, and CUDA agreeing with the CPU where there is one."""

from __future__ import annotations

import copy
import math
import time
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedmed.cli.client
import fedmed.cli.main
import fedmed.cli.server
import fedmed.cli.simulate
import fedmed.privacy.clipping
from fedmed.config import DeviceSettings, RunSettings, SimulationSettings, SiteSettings
from fedmed.device import exact_float32, resolve_device, synchronize
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.clipping import PerSampleClipper
from fedmed.rundir import RunDirectory
from fedmed.simulate.federated import federation_config
from fedmed.simulate.federated import site_settings as simulated_sites
from fedmed.simulate.scenario import load_scenario, simulation_device
from fedmed.simulate.sites import SimulationData
from fedmed.site.work import SiteWork
from fedmed.train import _dp_generators, predict
from tests.device_rounds import ROUNDS, digest, one_thread, seeded_round

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
needs_no_cuda = pytest.mark.skipif(CUDA, reason="needs a machine without CUDA")

# SHA-256 of each seeded round's packed update (tests/device_rounds.py), recorded by running
# those rounds on the code before the device refactor (commit abb360b, before fedmed.device
# existed), on one thread: see test_cpu_rounds_are_bit_for_bit_those_of_the_code_before_devices.
BEFORE_DEVICES = {
    "image": "20c2ce7f58e99fe10bf6bd96ae78174447c9c7213471384eb1676a7ae2358da9",
    "patient-adaptive": "5f2f4b12ee6c85d675f0c30c586265b45f16b44124830d7b8d4e04140ed35a6f",
    "scattering": "cec00a171a8e56622a7950a7b6fa73abc6a2d246abd449fb2dcdae83d43b921e",
    "plain": "e4b031017148977323eaa45bbcf70b6a8e92411f98898c9e307adff874c64f96",
}


def _clipped_sum(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, groups=None) -> torch.Tensor:
    clipper = PerSampleClipper(model, 0.3)
    try:
        clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"), None, groups)
    finally:
        clipper.remove()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def command(main, argv: list[str]) -> int:
    """A command's ``main`` in this process, without ``fedmed.runtime.entry_point``'s
    ``gc.freeze``, which would hold this test session's garbage to its end."""
    return main.__wrapped__(argv)


# -- the names ---------------------------------------------------------------------------


def test_auto_and_cpu_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if CUDA else "cpu")


@needs_no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_on_a_machine_without_it_is_refused_naming_the_setting_and_what_to_set(name):
    with pytest.raises(ValueError, match=rf'resources\.device = "{name}", but torch finds no CUDA.*'
                                         r'set resources\.device = "cpu"'):
        resolve_device(name)


@pytest.mark.parametrize("name", ["tpu", "CUDA", "cuda:", "cuda:-1", "cuda:01", "gpu", ""])
def test_an_unknown_device_is_refused_naming_the_value(name):
    with pytest.raises(ValueError, match=rf"resources\.device must be auto, cpu, cuda or cuda:N, got '{name}'"):
        resolve_device(name)
    with pytest.raises(ValueError, match=r"resources\.device must be"):
        DeviceSettings(device=name)


def test_a_gpu_number_past_the_machine_s_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r'resources\.device = "cuda:2", but this machine has 2 CUDA device.*'
                                         r'set resources\.device = "cuda:1" or lower'):
        resolve_device("cuda:2")


# -- refused when a command starts -------------------------------------------------------


@needs_no_cuda
def test_a_simulation_on_cuda_is_refused_before_any_site_starts(tmp_path, capsys):
    """fedmed-simulate, in this process: the scenario loads (its names are valid), then the
    device is refused before any data is prepared or any site started."""
    scenario = load_scenario(None, ["resources.device=cuda"])
    with pytest.raises(ValueError, match=r'resources\.device = "cuda", but torch finds no CUDA'):
        simulation_device(scenario)
    out = tmp_path / "out"
    assert command(fedmed.cli.simulate.main, ["--set", "resources.device=cuda", "--out", str(out)]) == 2
    assert 'error: resources.device = "cuda", but torch finds no CUDA' in capsys.readouterr().err
    assert not out.exists(), "nothing was started or written"
    assert command(fedmed.cli.simulate.main, ["--set", "resources.gpus_per_site=0.5", "--out", str(out)]) == 2
    assert ("error: resources.gpus_per_site = 0.5 reserves GPUs for the virtual sites, but torch finds no CUDA "
            "device on this machine; set resources.gpus_per_site = 0") in capsys.readouterr().err
    assert not out.exists()


def test_a_simulation_s_device_and_gpu_share_must_agree(monkeypatch):
    """Ray hides the GPUs from a virtual site that reserves none: CUDA needs a share, and a
    share needs CUDA (the rules, with CUDA pretended)."""

    def device(overrides):
        return simulation_device(load_scenario(None, overrides))

    assert device([]) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device([]) == "cpu", "auto: CUDA only for sites that reserve a GPU share"
    assert device(["resources.gpus_per_site=0.25"]) == "cuda"
    assert device(["resources.gpus_per_site=1", "resources.device=cuda"]) == "cuda"
    with pytest.raises(ValueError, match=r'resources\.device = "cuda" needs resources\.gpus_per_site > 0'):
        device(["resources.device=cuda"])
    with pytest.raises(ValueError, match=r'reserves GPUs that resources\.device = "cpu" leaves idle'):
        device(["resources.device=cpu", "resources.gpus_per_site=0.5"])
    with pytest.raises(ValueError, match=r'Ray gives each virtual site its own GPU; set resources\.device = "cuda"'):
        device(["resources.device=cuda:0", "resources.gpus_per_site=0.5"])
    with pytest.raises(ValueError, match=r"resources\.gpus_per_site must be >= 0, got -0\.5"):
        device(["resources.gpus_per_site=-0.5"])


def test_virtual_sites_get_the_simulation_s_device_and_ray_their_gpu_share(tmp_path, monkeypatch):
    data = SimulationData(("a", "b"), (tmp_path / "a", tmp_path / "b"), tmp_path / "test", "")
    scenario = load_scenario(None, ["partition.sites=2"])
    assert [s.device for s in simulated_sites(scenario, data, tmp_path, tmp_path)] == ["cpu", "cpu"]
    assert federation_config(scenario.simulation, 2) == "num-supernodes=2 client-resources-num-cpus=1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    scenario = load_scenario(None, ["partition.sites=2", "resources.gpus_per_site=0.5"])
    assert [s.device for s in simulated_sites(scenario, data, tmp_path, tmp_path)] == ["cuda", "cuda"]
    assert federation_config(scenario.simulation, 2) == (
        "num-supernodes=2 client-resources-num-cpus=1 client-resources-num-gpus=0.5"
    )


@needs_no_cuda
def test_every_command_refuses_cuda_at_start(tmp_path, capsys):
    """The coordinator before its run directory exists, a site before it reads its data or
    connects, and predict and pretrain before they read anything."""
    message = 'error: resources.device = "cuda", but torch finds no CUDA'
    run_dir = tmp_path / "run"
    assert command(fedmed.cli.server.main, ["--insecure", "--device", "cuda", "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().err and not run_dir.exists()
    site = ["--site", "st-mary", "--data", str(tmp_path / "no-such-data"), "--server", "coordinator:9092"]
    assert command(fedmed.cli.client.main, [*site, "--insecure", "--device", "cuda"]) == 2
    assert message in capsys.readouterr().err
    config = tmp_path / "site.toml"
    config.write_text('[resources]\ndevice = "cuda:1"\n')
    assert command(fedmed.cli.client.main, [*site, "--insecure", "--config", str(config)]) == 2
    assert 'error: resources.device = "cuda:1", but torch finds no CUDA' in capsys.readouterr().err
    assert command(fedmed.cli.main.main, ["predict", str(tmp_path / "model"), str(tmp_path), "--device", "cuda"]) == 2
    assert message in capsys.readouterr().err
    out = tmp_path / "public-model"
    assert command(fedmed.cli.main.main, ["pretrain", str(tmp_path / "public"), "--out", str(out), "--device", "cuda"]) == 2
    assert message in capsys.readouterr().err and not out.exists()


# -- whose choice ------------------------------------------------------------------------


def test_the_coordinator_cannot_choose_a_site_s_device(tmp_path):
    """The run's settings, which the coordinator signs and sends, have no device: one
    added is refused. A site computes on its own setting; the coordinator's own device
    stays in its run directory."""
    assert "device" not in RunSettings.__dataclass_fields__
    with pytest.raises(ValueError, match="the run config has an unknown setting 'device'"):
        RunSettings.from_flower({**RunSettings().to_flower(), "device": "cuda"})
    site = SiteSettings(name="st-mary", data=str(tmp_path), ledger=str(tmp_path / "ledger.jsonl"), device="cpu")
    assert SiteWork(site).device == torch.device("cpu")
    assert SiteSettings.from_flower(site.to_flower()).device == "cpu", "a site's node config carries its own"
    with pytest.raises(ValueError, match=r"resources\.device must be .* got 'tpu'"):
        SiteSettings(device="tpu")
    run_dir = RunDirectory(tmp_path / "run")
    assert run_dir.device() == "cpu", "a run directory from before the setting scores on the CPU, as it did"
    run_dir.write_device("cuda:0")
    assert run_dir.device() == "cuda:0"
    assert "gpus_per_site" in SimulationSettings.__dataclass_fields__


# -- the CPU computes what it did --------------------------------------------------------


@pytest.mark.parametrize("kind", ROUNDS)
def test_cpu_rounds_are_bit_for_bit_those_of_the_code_before_devices(kind, tmp_path):
    """One seeded round (the noise too: ``training.insecure_noise_seed``) with device "cpu"
    given, through the default path (no device: where the model is) and, on a machine
    without CUDA, with "auto": the same update, bit for bit, as the hash recorded on the
    code before the device refactor (commit abb360b). The hash covers every float32 of
    the packed update a site sends, so a change to it means the CPU computes another
    update than before: another sampling or noise stream, another order of additions, a
    tensor that went through another device or dtype. It was recorded on one thread, as
    this test runs, since a reduction split over threads may add in another order; the
    same round run twice in one process gave the same hash."""
    with one_thread():
        given = digest(seeded_round(kind, tmp_path / "cpu", device="cpu"))
        default = digest(seeded_round(kind, tmp_path / "default"))
        assert given == default
        if not CUDA:
            assert digest(seeded_round(kind, tmp_path / "auto", device="auto")) == given
    assert given == BEFORE_DEVICES[kind], f"the {kind} round's update changed on the CPU"


def test_cpu_noise_is_torch_s_cpu_generator_seeded_as_before():
    """The same streams as before devices: a CPU torch.Generator seeded from the round's
    SeedSequence (secrets when no seed is forced)."""
    sampling, noise = _dp_generators(5, 1)
    seeds = np.random.SeedSequence([5, 1]).generate_state(2, dtype=np.uint64)
    assert sampling.device == noise.device == torch.device("cpu")
    assert sampling.initial_seed() == int(seeds[0] >> 1) and noise.initial_seed() == int(seeds[1] >> 1)
    secret = _dp_generators(None, 1, torch.device("cpu"))
    assert all(g.device == torch.device("cpu") for g in secret)
    assert secret[1].initial_seed() != _dp_generators(None, 1)[1].initial_seed()


def test_the_autotuner_reads_its_clock_only_after_the_device_finished(monkeypatch):
    """CUDA kernels run asynchronously: every clock read of the route timing follows a
    synchronize of the batch's device, or the timing would be of the kernels' launch."""
    events: list[str] = []
    monkeypatch.setattr(fedmed.privacy.clipping, "synchronize", lambda device: events.append(f"sync {device}"))
    clock = types.SimpleNamespace(perf_counter=lambda: events.append("clock") or time.perf_counter())
    monkeypatch.setattr(fedmed.privacy.clipping, "time", clock)
    model = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
    x, y = torch.rand(6, 1, 16, 16), torch.tensor([0, 1, 0, 1, 1, 0])
    _clipped_sum(model, x, y)
    assert events.count("clock") >= 2 and events[0] != "clock"
    assert all(before == "sync cpu" for before, now in zip(events, events[1:]) if now == "clock")
    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronize(torch.device("cpu"))
    assert waited == []
    synchronize(torch.device("cuda:0"))
    assert waited == [torch.device("cuda:0")]


@pytest.mark.skipif(not hasattr(torch.backends.cudnn, "conv"), reason="needs torch's fp32_precision settings")
def test_cuda_computes_float32_in_float32_not_tf32(monkeypatch):
    """A clip factor from a TF32 norm could let a clipped gradient pass the clip norm: the
    clipper computes under ``exact_float32`` for its batch's device, which on CUDA asks for
    IEEE float32 and restores the setting after."""
    seen = []
    real = fedmed.privacy.clipping.exact_float32
    monkeypatch.setattr(fedmed.privacy.clipping, "exact_float32", lambda device: seen.append(device) or real(device))
    _clipped_sum(build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0), torch.rand(4, 1, 16, 16),
                 torch.tensor([0, 1, 1, 0]))
    assert seen == [torch.device("cpu")]
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with exact_float32(torch.device("cpu")):
        assert (conv.fp32_precision, matmul.fp32_precision) == before
    with exact_float32(torch.device("cuda")):
        assert conv.fp32_precision == matmul.fp32_precision == "ieee"
    assert (conv.fp32_precision, matmul.fp32_precision) == before


# -- CUDA agrees with the CPU ------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("frontend", ["pixels", "scattering"])
def test_one_dp_step_s_clipped_sum_on_cuda_is_the_cpu_s(frontend):
    """Before the noise: the same per-sample clipping and sum on both devices, to 1e-5."""
    model = build_model(ModelConfig(depth=10, width=8, image_size=16, frontend=frontend), seed=0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((12, 1, 16, 16), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, 2, 12))
    groups = torch.arange(12) // 3
    on_cuda = copy.deepcopy(model).to("cuda")
    for g in (None, groups):
        cpu = _clipped_sum(copy.deepcopy(model), x, y, g)
        gpu = _clipped_sum(copy.deepcopy(on_cuda), x.cuda(), y.cuda(), None if g is None else g.cuda())
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


@needs_cuda
def test_the_noise_on_cuda_has_the_calibrated_standard_deviation():
    """torch's CUDA generator (Philox) draws N(0, (noise_multiplier * clip_norm)^2) as the
    CPU's does: a million draws within 1 % of the standard deviation, centred."""
    noise_multiplier, clip_norm = 1.3, 0.7
    _, noise = _dp_generators(None, 1, torch.device("cuda"))
    assert noise.device.type == "cuda"
    draws = torch.empty(1_000_000, device="cuda").normal_(0.0, noise_multiplier * clip_norm, generator=noise)
    assert draws.device.type == "cuda"
    std = float(draws.std())
    assert math.isclose(std, noise_multiplier * clip_norm, rel_tol=0.01)
    assert abs(float(draws.mean())) < 5 * std / 1000


@needs_cuda
def test_predict_on_cuda_is_predict_on_the_cpu():
    model = build_model(ModelConfig(depth=10, width=8, image_size=16), seed=0)
    images = np.random.default_rng(1).random((40, 16, 16), dtype=np.float32)
    on_cpu = predict(model, images)
    on_cuda = predict(copy.deepcopy(model).to("cuda"), images)
    assert on_cuda.dtype == on_cpu.dtype == np.float32
    np.testing.assert_allclose(on_cuda, on_cpu, rtol=1e-5, atol=1e-5)
