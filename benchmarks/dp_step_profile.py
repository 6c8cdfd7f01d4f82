"""Where a DP-SGD step's time goes, part by part, and the shipped model's DP / non-private
step ratio.

    python benchmarks/dp_step_profile.py [--threads 2]

Part 1: ResNet-18 (width 32) on 28x28 images, batch 64, as in dp_throughput.py. It prints
the non-private step and fedmed's clipped step, split into the per-layer pieces
(per-sample gradients or their ghost inputs), the norms, the clipped sums, and the rest
(forward with hooks, backward to the layer outputs, optimizer).

Part 2: the shipped recipe's network (scattering stem, ResNet-10, width 8), fed its
precomputed scattering coefficients as a site feeds them. It prints its non-private and DP
steps on one thread.

Part 3: the same network's clipped step at patient level (64 images from patients of 3
images each, each patient's summed gradient clipped) against image level.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from fedmed.model import ModelConfig, build_model, fixed_inputs
from fedmed.privacy import clipping
from fedmed.privacy.clipping import PerSampleClipper
from fedmed.runtime import keep_freed_memory


def seconds_per_call(step, repeats: int) -> float:
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def steps(model, inputs, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    clipper = PerSampleClipper(model, 1.0)

    def plain():
        optimizer.zero_grad()
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    def private():
        optimizer.zero_grad(set_to_none=True)
        clipper.accumulate(inputs, lambda out: F.cross_entropy(out, labels, reduction="none"))
        optimizer.step()

    return plain, private


def timed_parts(private, repeats: int) -> dict[str, float]:
    """The clipped step's parts, by wrapping the clipper's per-layer work."""
    parts = {"pieces": 0.0, "norms": 0.0, "sums": 0.0}
    original = clipping._layer_pieces

    def timed(method, part):
        def call(*args):
            start = time.perf_counter()
            result = method(*args)
            parts[part] += time.perf_counter() - start
            return result
        return call

    def layer_pieces(*args):
        start = time.perf_counter()
        pieces = original(*args)
        parts["pieces"] += time.perf_counter() - start
        pieces.squared_norms = timed(pieces.squared_norms, "norms")
        pieces.weighted_sums = timed(pieces.weighted_sums, "sums")
        return pieces

    clipping._layer_pieces = layer_pieces
    try:
        private()  # warm-up: the autotuner's timing stays out of the parts
        parts.update({k: 0.0 for k in parts})
        total = seconds_per_call(private, repeats)
    finally:
        clipping._layer_pieces = original
    # seconds_per_call ran 2 warm-up calls plus ``repeats``: scale the parts to one step
    return {k: v / (repeats + 2) for k, v in parts.items()} | {"step": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 2, (64,))
    plain, private = steps(build_model(ModelConfig(depth=18, width=32, image_size=28)), x, y)
    non_private = seconds_per_call(plain, args.repeats)
    parts = timed_parts(private, args.repeats)
    parts["rest"] = parts["step"] - parts["pieces"] - parts["norms"] - parts["sums"]
    result = {"resnet18_width32": {"threads": args.threads, "non_private_s": round(non_private, 4),
                                   "dp_step_s": round(parts["step"], 4),
                                   "ratio": round(non_private / parts["step"], 3),
                                   "dp_parts_s": {k: round(v, 4) for k, v in parts.items() if k != "step"}}}

    torch.set_num_threads(1)
    model = build_model(ModelConfig(depth=10, width=8, image_size=28, frontend="scattering"))
    coefficients = torch.from_numpy(fixed_inputs(model, x.squeeze(1).numpy()))
    plain, private = steps(model, coefficients, y)
    _, from_images = steps(model, x, y)
    shipped = {"non_private_ms": seconds_per_call(plain, 30) * 1000, "dp_ms": seconds_per_call(private, 30) * 1000,
               "dp_from_images_ms": seconds_per_call(from_images, 10) * 1000}
    shipped["ratio"] = shipped["non_private_ms"] / shipped["dp_ms"]
    result["shipped_scattering_resnet10_width8_one_thread"] = {k: round(v, 3) for k, v in shipped.items()}

    groups = torch.arange(64) // 3  # patients of three images
    clipper = PerSampleClipper(model, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def per_patient():  # as steps()'s private step, with the patients as groups
        optimizer.zero_grad(set_to_none=True)
        clipper.accumulate(coefficients, lambda out: F.cross_entropy(out, y, reduction="none"), groups=groups)
        optimizer.step()

    image_level = seconds_per_call(private, 30) * 1000
    patient_level = seconds_per_call(per_patient, 30) * 1000
    result["patient_level_one_thread"] = {"image_level_dp_ms": round(image_level, 3),
                                          "patient_level_dp_ms": round(patient_level, 3),
                                          "patient_over_image_time": round(patient_level / image_level, 3)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
