"""The scattering front-end's coefficients: fedmed's stacked wavelets (``fedmed.scattering``,
through ``fedmed.model.fixed_inputs``, as a site computes them) against kymatio's own
path-by-path loop, on the same images and filters.

Usage: python benchmarks/scattering_speed.py [--images 32] [--threads 2]

Prints one Markdown row per image size (BENCHMARKS.md, "Resolution (issue 28)"): the
median of 5 passes over ``--images`` random images, per image, after checking that both
give the same coefficients bit for bit.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D

from fedmed.model import ModelConfig, ScatteringStem, build_model, fixed_inputs

SIZES = (28, 64, 128, 224)
PASSES = 5


def median_seconds(work: Callable[[], object]) -> float:
    times = []
    for _ in range(PASSES):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| px | J | kymatio's loop (ms/image) | fedmed (ms/image) | images per pass |")
    print("|---|---|---|---|---|")
    for size in SIZES:
        model = build_model(ModelConfig(depth=10, width=8, image_size=size, frontend="scattering"))
        stem = model.frontend
        assert isinstance(stem, ScatteringStem)
        kymatio = ScatteringTorch2D(J=stem.scales, shape=(size, size), L=8)
        images = np.random.default_rng(size).random((args.images, size, size), dtype=np.float32)

        def loop(kymatio: ScatteringTorch2D = kymatio, images: np.ndarray = images) -> np.ndarray:
            return kymatio(torch.from_numpy(images).unsqueeze(1)).flatten(1, 2).numpy()

        def stacked(model: torch.nn.Module = model, images: np.ndarray = images) -> np.ndarray:
            return fixed_inputs(model, images)

        if not np.array_equal(loop(), stacked()):
            raise SystemExit(f"{size} px: fedmed's coefficients differ from kymatio's")
        per_image = [median_seconds(work) / args.images * 1000 for work in (loop, stacked)]
        print(
            f"| {size} | {stem.scales} | {per_image[0]:.2f} | {per_image[1]:.2f} | {stem.images_per_pass()} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
