"""DP-SGD throughput against non-private training, same model, data and threads, one run.

Measures images per second of whole local rounds (``fedmed.train.train_round``: Poisson
sampling, clipping, noise, optimizer) for ResNet-18 (base width 32) on 28x28 images with a
logical batch of 64, and the same step done by Opacus's own engines for comparison. Then
the peak memory of one DP step at logical batch 256, each in a fresh process.

    python benchmarks/dp_throughput.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

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


def fedmed_round_throughput(dp: bool, images, labels, batch: int, rounds: int) -> float:
    """Images per second over ``rounds`` rounds, after one warm-up round."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    ledger = PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.jsonl")
    train = TrainConfig(batch_size=batch, physical_batch_size=batch, learning_rate=0.01)
    privacy = PrivacyConfig(dp=dp, target_epsilon=1e4 if dp else 8.0, planned_rounds=rounds + 1)
    train_round(model, TrainingData(images, labels), train=train, privacy=privacy, ledger=ledger, site="bench",
                run_id="bench", round_number=0)
    start = time.perf_counter()
    seen = 0
    for r in range(1, rounds + 1):
        seen += train_round(model, TrainingData(images, labels), train=train, privacy=privacy, ledger=ledger,
                            site="bench", run_id="bench", round_number=r).steps * batch
    return seen / (time.perf_counter() - start)


def clipper_throughput(route: str | None, batch: int, steps: int) -> float:
    """Images per second of fedmed's clipped step alone, with one conv route forced."""
    torch.manual_seed(0)
    model = build_model(MODEL)
    clipper = PerSampleClipper(model, 1.0, conv_route=route)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 2, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        clipper.accumulate(x, lambda out: F.cross_entropy(out, y, reduction="none"))
        optimizer.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def opacus_throughput(mode: str, batch: int, steps: int) -> float | str:
    """Images per second of Opacus's PrivacyEngine in ``mode`` (hooks, ghost, functorch)."""
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    model = build_model(MODEL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    images, labels = fake_site(batch * (steps + 1))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)),
        batch_size=batch,
    )
    criterion = torch.nn.CrossEntropyLoss()
    try:
        made = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0,
            max_grad_norm=1.0, grad_sample_mode=mode, criterion=criterion,
        )
    except Exception as exc:  # report, do not hide, an engine that cannot run this model
        return f"failed: {type(exc).__name__}: {exc}"[:200]
    model, optimizer, criterion, loader = made if len(made) == 4 else (*made[:2], criterion, made[2])
    seen, start = 0, None
    for index, (x, y) in enumerate(loader):
        if index == 1:
            start, seen = time.perf_counter(), 0
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        seen += len(y)
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
    train_round(model, TrainingData(images, labels), train=train, privacy=privacy, ledger=ledger, site="m", run_id="m",
                round_number=1)
    peak = _status_mib("VmHWM")
    print(json.dumps({"before_mib": round(before), "peak_mib": round(peak), "step_mib": round(peak - before)}))


def peak_memory(batch: int, physical: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--memory-child", str(batch), str(physical)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds of 20 steps each")
    parser.add_argument("--steps", type=int, default=10, help="steps per engine comparison")
    parser.add_argument("--memory-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    keep_freed_memory()  # as a site's worker does (fedmed.runtime)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        peak_memory_child(*args.memory_child)
        return

    images, labels = fake_site(args.batch * 20)
    plain = fedmed_round_throughput(False, images, labels, args.batch, args.rounds)
    private = fedmed_round_throughput(True, images, labels, args.batch, args.rounds)
    result = {
        "threads": args.threads,
        "logical_batch": args.batch,
        "non_private_img_s": round(plain, 1),
        "fedmed_dp_img_s": round(private, 1),
        "ratio_dp_to_non_private": round(private / plain, 3),
        "clipped_step_img_s": {route or "autotuned": round(clipper_throughput(route, args.batch, args.steps), 1)
                               for route in (None, *CONV_ROUTES)},
        "opacus_img_s": {},
    }
    for mode in ("hooks", "ghost", "functorch"):
        value = opacus_throughput(mode, args.batch, args.steps)
        result["opacus_img_s"][mode] = round(value, 1) if isinstance(value, float) else value
    result["memory_logical_256"] = {f"physical_{p}": peak_memory(256, p) for p in (256, 64)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
