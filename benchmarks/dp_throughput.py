"""DP-SGD throughput against non-private training, same model, data and threads, one run.

Measures images per second of whole local rounds (``fedmed.train.train_round``: Poisson
sampling, clipping, noise, optimizer) for ResNet-18 (base width 32) on 28x28 images with a
logical batch of 64, and the same step done by Opacus's own engines for comparison. Then
the peak memory of one DP step at logical batch 256, each in a fresh process.

    python benchmarks/dp_throughput.py [--device cpu|cuda]

The measurement functions take a device (``benchmarks/gpu_check.py`` calls them on CUDA);
on CUDA the clock is read after the device has finished (``fedmed.device.synchronize``).

Variants of the DP step, each as a ratio against non-private rounds measured in the same
process (rounds of every variant interleaved, ``--repeats`` times, medians):

    OMP_NUM_THREADS=1 python benchmarks/dp_throughput.py --threads 1 --variants base channels-last compile

``channels-last``: the model's parameters in channels-last memory format (convolutions then
run and return channels-last); ``compile``: ``nn.Module.compile()`` (torch.compile) of the
model's forward pass; ``compile-hooks-eager``: the same with the clipper's recording hook
kept out of the compiled graphs (DP rounds only). A variant whose round fails is reported
with its error. BENCHMARKS.md, "DP-SGD throughput", has the results (2026-12-03).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmed.device import synchronize
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.clipping import CONV_ROUTES, PerSampleClipper
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.runtime import keep_freed_memory
from fedmed.train import TrainConfig, TrainingData, train_round

MODEL = ModelConfig(depth=18, width=32, image_size=28)


def fake_site(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28), dtype=np.float32), rng.integers(0, 2, n)


VARIANTS: dict[str, Callable[[torch.nn.Module], None]] = {
    "base": lambda model: None,
    "channels-last": lambda model: model.to(memory_format=torch.channels_last),
    "compile": lambda model: model.compile(),
    "compile-hooks-eager": lambda model: model.compile(),  # and the clipper's hook kept out of the graphs
}


@contextmanager
def clipper_hook_outside_graphs(variant: str) -> Iterator[None]:
    """For ``compile-hooks-eager``: the clipper's recording hook excluded from compilation
    (``torch.compiler.disable``), so that the graph breaks at every recorded layer and each
    layer's output is a tensor of the eager autograd graph, while this variant's rounds run."""
    if variant != "compile-hooks-eager":
        yield
        return
    record = PerSampleClipper._record
    PerSampleClipper._record = torch.compiler.disable(record)  # type: ignore[method-assign]
    try:
        yield
    finally:
        PerSampleClipper._record = record  # type: ignore[method-assign]


class FedmedRounds:
    """Local rounds of one model through ``fedmed.train.train_round``, on ``device``."""

    def __init__(self, dp: bool, images, labels, batch: int, rounds: int, device="cpu", variant: str = "base") -> None:
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.model = build_model(MODEL).to(self.device)
        VARIANTS[variant](self.model)
        self.data = TrainingData(images, labels)
        self.batch = batch
        self.ledger = PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.jsonl")
        self.train = TrainConfig(batch_size=batch, physical_batch_size=batch, learning_rate=0.01)
        self.privacy = PrivacyConfig(dp=dp, target_epsilon=1e4 if dp else 8.0, planned_rounds=rounds)
        self.round_number = 0
        self.variant = variant

    def run(self) -> int:
        """One round; the images it trained on (steps x logical batch)."""
        with clipper_hook_outside_graphs(self.variant):
            steps = self._round()
        self.round_number += 1
        return steps * self.batch

    def _round(self) -> int:
        return train_round(
            self.model,
            self.data,
            train=self.train,
            privacy=self.privacy,
            ledger=self.ledger,
            site="bench",
            run_id="bench",
            round_number=self.round_number,
        ).steps

    def throughput(self, rounds: int) -> float:
        """Images per second over ``rounds`` rounds."""
        synchronize(self.device)
        start = time.perf_counter()
        seen = sum(self.run() for _ in range(rounds))
        synchronize(self.device)
        return seen / (time.perf_counter() - start)


def fedmed_round_throughput(dp: bool, images, labels, batch: int, rounds: int, device="cpu") -> float:
    """Images per second over ``rounds`` rounds, after one warm-up round."""
    bench = FedmedRounds(dp, images, labels, batch, rounds + 1, device)
    bench.run()
    return bench.throughput(rounds)


def clipper_throughput(route: str | None, batch: int, steps: int, device="cpu") -> float:
    """Images per second of fedmed's clipped step alone, with one conv route forced."""
    torch.manual_seed(0)
    device = torch.device(device)
    model = build_model(MODEL).to(device)
    clipper = PerSampleClipper(model, 1.0, conv_route=route)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(batch, 1, 28, 28).to(device), torch.randint(0, 2, (batch,)).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"))
        optimizer.step()

    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - start)


def opacus_throughput(mode: str, batch: int, steps: int, device="cpu") -> float | str:
    """Images per second of Opacus's PrivacyEngine in ``mode`` (hooks, ghost, functorch)."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    device = torch.device(device)
    model = build_model(MODEL).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = fake_site(batch * (steps + 1))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)),
        batch_size=batch,
    )
    criterion = torch.nn.CrossEntropyLoss()
    try:
        made = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=mode,
            criterion=criterion,
        )
    except Exception as exc:  # report, do not hide, an engine that cannot run this model
        return f"failed: {type(exc).__name__}: {exc}"[:200]
    model, optimizer, criterion, loader = made if len(made) == 4 else (*made[:2], criterion, made[2])
    seen, start = 0, time.perf_counter()
    for index, (x, y) in enumerate(loader):
        if index == 1:
            synchronize(device)
            start, seen = time.perf_counter(), 0
        optimizer.zero_grad()
        criterion(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
        seen += len(y)
    synchronize(device)
    return seen / (time.perf_counter() - start)


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(batch: int, physical: int) -> None:
    """Run in a fresh process: print resident memory before and at the peak of DP steps."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    images, labels = fake_site(batch * 4)
    ledger = PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.jsonl")
    train = TrainConfig(batch_size=batch, physical_batch_size=physical, epochs=1)
    privacy = PrivacyConfig(target_epsilon=1e4)
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5\n")  # restart the peak (VmHWM) from here
    # n = 4 x batch and 1 epoch: 4 logical steps of ~batch images each.
    train_round(
        model,
        TrainingData(images, labels),
        train=train,
        privacy=privacy,
        ledger=ledger,
        site="m",
        run_id="m",
        round_number=1,
    )
    peak = _status_mib("VmHWM")
    print(json.dumps({"before_mib": round(before), "peak_mib": round(peak), "step_mib": round(peak - before)}))


def peak_memory(batch: int, physical: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(batch), str(physical)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_variants(variants: list[str], images, labels, batch: int, repeats: int, device="cpu") -> dict:
    """Non-private and DP rounds of every variant, built and warmed up once each, then one
    timed round of each in turn, ``repeats`` times: img/s per repeat, medians, and each DP
    variant's median ratio to the base non-private rounds of the same repeats."""
    benches: dict[str, FedmedRounds | str] = {}
    for variant in dict.fromkeys(["base", *variants]):
        for dp in (True,) if variant == "compile-hooks-eager" else (False, True):  # non-private: "compile"
            name = f"{'dp' if dp else 'non-private'} {variant}"
            try:
                bench = FedmedRounds(dp, images, labels, batch, repeats + 1, device, variant)
                start = time.perf_counter()
                bench.run()  # warm-up (and compilation)
                print(f"{name}: warm-up round {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
                benches[name] = bench
            except Exception as exc:  # report, do not hide, a variant that cannot run
                benches[name] = f"failed: {type(exc).__name__}: {exc}"[:300]
                print(f"{name}: {benches[name]}", file=sys.stderr, flush=True)
    rates: dict[str, list[float]] = {name: [] for name, b in benches.items() if not isinstance(b, str)}
    for _ in range(repeats):
        for name in rates:
            bench = benches[name]
            assert not isinstance(bench, str)
            rates[name].append(bench.throughput(1))
    reference = rates["non-private base"]
    result: dict = {"img_s": {name: [round(r, 1) for r in values] for name, values in rates.items()}}
    result["median_img_s"] = {name: round(float(np.median(values)), 1) for name, values in rates.items()}
    result["median_ratio_to_non_private_base"] = {
        name: round(float(np.median(np.array(values) / np.array(reference))), 3)
        for name, values in rates.items()
        if name.startswith("dp ")
    }
    result["failed"] = {name: b for name, b in benches.items() if isinstance(b, str)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (memory rows: CPU only)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds of --site-steps steps each")
    parser.add_argument("--site-steps", type=int, default=20, help="steps per round (the site's images / batch)")
    parser.add_argument("--steps", type=int, default=10, help="steps per engine comparison")
    parser.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="compare these DP step variants")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds per variant (--variants)")
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep_freed_memory()  # as a site's worker does (fedmed.runtime)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(*args.memory_child)
        return

    images, labels = fake_site(args.batch * args.site_steps)
    if args.variants:
        result = {
            "threads": args.threads,
            "device": args.device,
            "logical_batch": args.batch,
            "steps_per_round": args.site_steps,
            "repeats": args.repeats,
        }
        result |= compare_variants(args.variants, images, labels, args.batch, args.repeats, args.device)
        print(json.dumps(result, indent=2))
        return
    plain = fedmed_round_throughput(False, images, labels, args.batch, args.rounds, args.device)
    private = fedmed_round_throughput(True, images, labels, args.batch, args.rounds, args.device)
    result = {
        "threads": args.threads,
        "logical_batch": args.batch,
        "non_private_img_s": round(plain, 1),
        "fedmed_dp_img_s": round(private, 1),
        "ratio_dp_to_non_private": round(private / plain, 3),
        "clipped_step_img_s": {
            route or "autotuned": round(clipper_throughput(route, args.batch, args.steps, args.device), 1)
            for route in (None, *CONV_ROUTES)
        },
        "opacus_img_s": {},
    }
    for mode in ("hooks", "ghost", "functorch"):
        value = opacus_throughput(mode, args.batch, args.steps, args.device)
        result["opacus_img_s"][mode] = round(value, 1) if isinstance(value, float) else value
    if torch.device(args.device).type == "cpu":  # resident memory: a CPU measurement
        result["memory_logical_256"] = {f"physical_{p}": peak_memory(256, p) for p in (256, 64)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
