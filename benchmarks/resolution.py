"""DP-SGD step time and peak memory of one site against image size, for both front-ends.

    python benchmarks/resolution.py [--threads 2] [--device cpu|cuda] [--out resolution.json]

The shipped scenarios' network (ResNet-10, width 8) at 28, 64, 128 and 224 px with the
pixels and the scattering front-end. A step is fedmed's DP-SGD step as
``fedmed.train`` takes it: per-sample clipping by ``PerSampleClipper`` (routes autotuned),
Gaussian noise over every trained parameter from one flat buffer, SGD; a logical batch of
64 in physical batches of the scenarios' ``physical_batch_size``. The scattering model is
fed its precomputed coefficients (``fedmed.model.fixed_inputs``), as a site feeds it; their
one-off computation is timed separately, per image, on the CPU where sites compute them.

Each configuration runs in a fresh process, so that one's memory is not another's. Peak
memory is the growth over the memory held just before the first step, across every step
(the first ones included: a site's first step autotunes the clipping routes): on the CPU
the peak resident set (VmHWM, reset through /proc/self/clear_refs, as dp_throughput.py
measures it; torch's allocations are invisible to tracemalloc); on CUDA
``torch.cuda.max_memory_allocated``, reset before the first step, with its absolute peak
too: what one site's model, batch and step hold on the GPU at most (the CUDA context is
not counted: ``benchmarks/gpu_check.py`` measures it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmed.config import FRONTENDS, RunSettings
from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.privacy.clipping import PerSampleClipper
from fedmed.runtime import keep_freed_memory

SIZES = (28, 64, 128, 224)
RECIPE = {"depth": 10, "width": 8}  # the shipped scenarios' network
LOGICAL_BATCH = 64
PHYSICAL_BATCH = RunSettings.physical_batch_size  # the scenarios' (the default)
COEFFICIENT_IMAGES = 16  # images whose coefficients are computed (and timed); repeated to a batch
NOISE_MULTIPLIER = 1.0


def config_of(size: int, frontend: str) -> ModelConfig:
    return ModelConfig(**RECIPE, image_size=size, frontend=frontend)


def site_batch(model: torch.nn.Module, size: int) -> tuple[np.ndarray, float | None]:
    """A logical batch of what the model is fed, and the coefficients' one-off seconds per
    image (None for pixels). Step time does not depend on the values, so the computed
    coefficients are repeated up to the batch rather than computed 64 times."""
    images = np.random.default_rng(0).random((COEFFICIENT_IMAGES, size, size), dtype=np.float32)
    start = time.perf_counter()
    inputs = fixed_inputs(model, images)
    seconds = (time.perf_counter() - start) / len(images) if inputs is not images else None
    repeats = math.ceil(LOGICAL_BATCH / len(inputs))
    batch = np.concatenate([inputs] * repeats)[:LOGICAL_BATCH]
    return (batch[:, None] if batch.ndim == 3 else batch), seconds


def per_sample_loss(labels: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda outputs: F.cross_entropy(outputs, labels, reduction="none")


def dp_step(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    """One DP-SGD step on ``inputs`` as ``fedmed.train``'s private loop takes it."""
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.zeros(sum(p.numel() for p in params), device=inputs.device)
    noise = torch.empty_like(flat)
    offset = 0
    for p in params:  # every gradient a view of one flat buffer, as fedmed.train does
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()

    def step() -> None:
        flat.zero_()
        for start in range(0, len(labels), PHYSICAL_BATCH):
            rows = slice(start, start + PHYSICAL_BATCH)
            clipper.accumulate(inputs[rows], per_sample_loss(labels[rows]))
        flat.add_(noise.normal_(0.0, NOISE_MULTIPLIER))
        flat.div_(LOGICAL_BATCH)
        optimizer.step()

    return step


class PeakMemory:
    """Peak memory growth over what is held at ``start``, on the CPU or a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.before = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.before = _status_mib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5\n")  # restart the peak (VmHWM) from here

    def growth_mib(self) -> float:
        return self.peak_mib() - self.before

    def peak_mib(self) -> float:
        """The peak since ``start``: of torch's allocations on CUDA, of the resident set on the CPU."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _status_mib("VmHWM")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(size: int, frontend: str, device: torch.device, warmup: int, steps: int) -> dict:
    """One configuration, in this (fresh) process."""
    config = config_of(size, frontend)
    model = build_model(config, seed=0)
    batch, coefficient_s = site_batch(model, size)  # on the CPU, where a site computes them
    model = model.to(device)
    inputs = torch.from_numpy(batch).to(device)
    labels = torch.arange(LOGICAL_BATCH, device=device) % 2
    step = dp_step(model, inputs, labels)
    memory = PeakMemory(device)
    memory.start()
    for _ in range(warmup):  # the first steps autotune the clipping routes
        step()
    seconds = float(np.median([_timed(step, device) for _ in range(steps)]))
    row = {
        "image_size": size,
        "frontend": frontend,
        "scattering_scales": config.scattering_scales,
        "stage_input_side": int(inputs.shape[-1]) if frontend == "scattering" else None,
        "input_channels": int(inputs.shape[1]),
        "trained_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "dp_step_ms": round(seconds * 1000, 2),  # the median step
        "images_per_s": round(LOGICAL_BATCH / seconds, 1),
        "peak_memory_growth_mib": round(memory.growth_mib(), 1),
        "coefficients_ms_per_image": None if coefficient_s is None else round(coefficient_s * 1000, 2),
        "timed_steps": steps,
    }
    if device.type == "cuda":  # one site's whole footprint in torch's allocations, not only the step's
        row["peak_gpu_memory_mib"] = round(memory.peak_mib(), 1)
    return row


def _timed(step: Callable[[], None], device: torch.device) -> float:
    """Seconds of one step; on CUDA, to the end of its kernels."""
    start = _synchronized(device)
    step()
    return _synchronized(device) - start


def _synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_child(args: argparse.Namespace, size: int, frontend: str, timeout: float | None = None) -> dict:
    """``measure`` in a fresh process with the same threads and device (killed after ``timeout`` s)."""
    command = [sys.executable, __file__, "--child", str(size), frontend, "--threads", str(args.threads)]
    command += ["--device", args.device, "--warmup", str(args.warmup), "--steps", str(steps_for(args, size))]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}  # the child's OpenMP pool as torch's
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def steps_for(args: argparse.Namespace, size: int) -> int:
    """Fewer timed steps at the largest sizes, where one step already takes long on a CPU."""
    return args.steps if size <= 64 or args.device != "cpu" else max(1, args.steps // 2)


def markdown(rows: list[dict], device: str) -> str:
    gpu = device != "cpu"
    memory = "peak GPU memory growth (MiB)" if gpu else "peak RSS growth (MiB)"
    per_site = " peak GPU memory per site (MiB) |" if gpu else ""
    lines = [
        f"| px | front-end | J | stages' input | trained params | DP step (ms, median) | img/s | {memory} "
        f"|{per_site} coefficients (ms/image, once) |",
        "|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    for r in rows:
        side = f"{r['input_channels']} x {r['stage_input_side']}^2" if r["stage_input_side"] else "image"
        lines.append(
            f"| {r['image_size']} | {r['frontend']} | {r['scattering_scales'] or '-'} | {side} | "
            f"{r['trained_parameters']:,} | {r['dp_step_ms']:,.1f} | {r['images_per_s']:,.1f} | "
            f"{r['peak_memory_growth_mib']:,.0f} | "
            + (f"{r['peak_gpu_memory_mib']:,.0f} | " if gpu else "")
            + f"{'-' if r['coefficients_ms_per_image'] is None else format(r['coefficients_ms_per_image'], '.1f')} |"
        )
    return "\n".join(lines)


def machine(args: argparse.Namespace) -> dict:
    device = args.device
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (route autotuning)")
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps, median reported (half above 64 px on a CPU)"
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--out", type=Path, help="write the rows and the machine as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    keep_freed_memory()  # as a site's worker does (fedmed.runtime)
    torch.set_num_threads(args.threads)
    if args.child:
        size, frontend = int(args.child[0]), args.child[1]
        print(json.dumps(measure(size, frontend, torch.device(args.device), args.warmup, args.steps)))
        return
    rows = []
    for size in args.sizes:
        for frontend in FRONTENDS:
            rows.append(run_child(args, size, frontend))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows, args.device))
    if args.out:
        document = {"machine": machine(args), "command": " ".join(sys.argv), "rows": rows}
        args.out.write_text(json.dumps(document, indent=2) + "\n")


if __name__ == "__main__":
    main()
