"""The GPU checks of fedmed in one run, written as a Markdown section for BENCHMARKS.md.

On a machine with CUDA, from the repository root (about 7 minutes at most; every step has
its own time limit, so a step that hangs or fails is reported and the next one runs):

    python3 benchmarks/gpu_check.py --out gpu-check.md

Steps, each in a fresh process (so no step's memory or CUDA state is another's):

1. ``facts``: Python, torch, CUDA, cuDNN, the GPUs, and which of fedmed's packages import;
2. ``tests``: ``python -m pytest -q tests/test_device.py`` (the CUDA tests skip without CUDA);
3. ``throughput``: ``benchmarks/dp_throughput.py``'s measurements on the device: whole
   non-private and DP rounds through ``fedmed.train.train_round``, img/s and their ratio;
4. ``resolution``: ``benchmarks/resolution.py`` on the device: the DP step at 28, 64, 128
   and 224 px for both front-ends, with the peak GPU memory of each (each size in its own
   process, so the peak starts afresh);
5. ``memory``: what one virtual site of the shipped scenario (simulations/default.toml)
   holds on the GPU over a DP round and its evaluation, the CUDA context included, and so
   about how many sites share one GPU (``resources.gpus_per_site``).

Packages. torch with CUDA, torchvision, numpy and pytest must be on the machine. No step
imports flwr (nor Ray): ``fedmed.train`` and the modules these steps use never load it.
Before a step runs, its packages are looked up; a step that lacks one is skipped and the
report names the package:

* every step but ``facts``: kymatio (``fedmed.model`` imports its 2-D scattering) and scipy
  (kymatio's dependency), plus kymatio's own small ones (appdirs, configparser);
* ``throughput`` and ``memory``'s round (DP rounds): opacus (Poisson sampler; RDP
  accountant) with opt_einsum, and dp-accounting (the PLD noise calibration) with absl-py,
  attrs, dm-tree (and its wrapt) and mpmath; without them ``memory`` measures the DP step
  alone instead of a round;
* ``tests`` (test collection imports fedmed's CLI, site and simulation modules, and
  tests/conftest.py): all of the above, and pydicom, pylibjpeg with pylibjpeg-libjpeg,
  pylibjpeg-openjpeg and pylibjpeg-rle, cryptography (with cffi), psutil, tomli-w, filelock
  and requests.

Where the GPU machine has no internet, bring them as wheels in a folder of the working tree
(mpmath and filelock come with torch):

    pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \\
        --no-deps -d wheels kymatio scipy appdirs configparser opacus opt_einsum dp-accounting \\
        absl-py "attrs<24" "dm-tree~=0.1.8" wrapt pydicom pylibjpeg pylibjpeg-libjpeg \\
        pylibjpeg-openjpeg pylibjpeg-rle cryptography cffi pycparser psutil tomli-w requests \\
        certifi idna urllib3 charset-normalizer
    # on the GPU machine, leaving its torch as it is:
    python3 -m pip install --no-index --no-deps wheels/*.whl

On a machine without CUDA the whole script runs end to end with tiny sizes (a few
minutes on 2 cores; the CUDA tests then report skips):

    python benchmarks/gpu_check.py --device cpu --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ("facts", "tests", "throughput", "resolution", "memory")
# Seconds each step may take on the GPU machine (7.5 minutes in all); --quick on a CPU: the same.
TIME_LIMITS = {"facts": 30, "tests": 120, "throughput": 90, "resolution": 150, "memory": 60}
# Python module -> the package to install, for each step's imports (see the docstring).
MODEL = {"kymatio": "kymatio", "scipy": "scipy"}
DP = {"opacus": "opacus", "dp_accounting": "dp-accounting"}
TESTS = {
    "pydicom": "pydicom",
    "pylibjpeg": "pylibjpeg",
    "cryptography": "cryptography",
    "psutil": "psutil",
    "tomli_w": "tomli-w",
    "filelock": "filelock",
    "requests": "requests",
    "pytest": "pytest",
}
NEEDS = {
    "facts": {},
    "tests": MODEL | DP | TESTS,
    "throughput": MODEL | DP,
    "resolution": MODEL,
    "memory": MODEL,  # its DP round also needs DP's; without them it measures the step alone
}
CHECKED = ("torch", "torchvision", "numpy", *MODEL, *DP, *TESTS, "flwr", "ray")
SCENARIO = ROOT / "simulations" / "default.toml"


def missing(modules: dict[str, str]) -> list[str]:
    """The packages of ``modules`` that this Python cannot import."""
    return [package for module, package in modules.items() if importlib.util.find_spec(module) is None]


# -- the steps, each run in its own process (--child STEP) ------------------------------------


def step_facts(args: argparse.Namespace) -> dict:
    import torch

    facts: dict = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none",
        "cuDNN": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else "none",
        "CUDA available": torch.cuda.is_available(),
        "GPUs": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts[f"cuda:{index}"] = (
                f"{props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
            )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            facts["driver"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            facts["driver"] = f"nvidia-smi: {exc}"
    facts["importable"] = {name: importlib.util.find_spec(name) is not None for name in CHECKED}
    lines = ["| fact | value |", "|---|---|"]
    for key, value in facts.items():
        if key == "importable":
            value = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in value.items())
        lines.append(f"| {key} | {value} |")
    return {"data": facts, "markdown": "\n".join(lines)}


def step_throughput(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    import dp_throughput as bench

    from fedmed.runtime import keep_freed_memory

    keep_freed_memory()  # as dp_throughput.py and a site's worker do
    torch.set_num_threads(args.threads)
    batch, site_steps, rounds, steps = (16, 4, 1, 2) if args.quick else (64, 20, 2, 10)
    images, labels = bench.fake_site(batch * site_steps)
    plain = bench.fedmed_round_throughput(False, images, labels, batch, rounds, args.device)
    private = bench.fedmed_round_throughput(True, images, labels, batch, rounds, args.device)
    clipped = bench.clipper_throughput(None, batch, steps, args.device)
    opacus = bench.opacus_throughput("hooks", batch, steps, args.device)
    data = {
        "device": args.device,
        "threads": args.threads,
        "logical_batch": batch,
        "steps_per_round": site_steps,
        "measured_rounds": rounds,
        "non_private_img_s": round(plain, 1),
        "fedmed_dp_img_s": round(private, 1),
        "ratio_dp_to_non_private": round(private / plain, 3),
        "clipped_step_autotuned_img_s": round(clipped, 1),
        "opacus_hooks_img_s": round(opacus, 1) if isinstance(opacus, float) else opacus,
    }

    def row(name: str, value: float | str) -> str:
        if isinstance(value, str):
            return f"| {name} | {value} | - |"
        return f"| {name} | {value:,.1f} | {value / plain:.3f} |"

    lines = [
        f"ResNet-18 (base width 32, GroupNorm), 28x28 grey images, logical batch {batch}, {site_steps} steps "
        f"per round, {rounds} measured round(s) after a warm-up round, {args.threads} CPU thread(s), "
        f"device {args.device}.",
        "",
        "| engine | img/s | / non-private |",
        "|---|---|---|",
        row("non-private round (fedmed, `dp=False`)", plain),
        row("**fedmed DP-SGD round**", private),
        row("fedmed clipped step alone, autotuned routes", clipped),
        row("Opacus hooks (same process)", data["opacus_hooks_img_s"]),
    ]
    return {"data": data, "markdown": "\n".join(lines)}


def step_resolution(args: argparse.Namespace) -> dict:
    sys.path.insert(0, str(HERE))
    import resolution

    from fedmed.config import FRONTENDS

    sizes = (28, 64) if args.quick else resolution.SIZES
    options = argparse.Namespace(
        threads=args.threads, device=args.device, warmup=1 if args.quick else 2, steps=2 if args.quick else 10
    )
    rows, failures = [], []
    deadline = time.monotonic() + args.limit - 5
    for size in sizes:
        for frontend in FRONTENDS:
            left = deadline - time.monotonic()
            if left <= 1:
                failures.append(f"{size} px {frontend}: not run, the step's time limit was reached")
                continue
            try:
                rows.append(resolution.run_child(options, size, frontend, timeout=left))
            except subprocess.TimeoutExpired:
                failures.append(f"{size} px {frontend}: timed out")
            except subprocess.CalledProcessError as exc:
                failures.append(f"{size} px {frontend}: failed: {_tail(exc.stderr)}")
    command = (
        f"python benchmarks/resolution.py --device {options.device} --threads {options.threads} "
        f"--warmup {options.warmup} --steps {options.steps} --sizes {' '.join(map(str, sizes))}"
    )
    text = [
        f"Each row as `{command}` computes it (steps: {options.steps} timed after {options.warmup} warm-up, "
        "median; on a CPU, half as many above 64 px).",
        "",
    ]
    if rows:
        text.append(resolution.markdown(rows, options.device))
    text += [f"\n- {failure}" for failure in failures]
    return {"data": {"rows": rows, "failures": failures}, "markdown": "\n".join(text)}


def step_memory(args: argparse.Namespace) -> dict:
    """One virtual site of the shipped scenario: a DP round and its evaluation, on the device."""
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    import resolution

    from fedmed.model import ModelConfig, build_model, fixed_inputs
    from fedmed.runtime import keep_freed_memory
    from fedmed.simulate.scenario import load_scenario

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    scenario = load_scenario(SCENARIO)
    run, simulation = scenario.run, scenario.simulation
    pool = 96 if args.quick else simulation.images // simulation.sites  # an average site's images
    held_out = pool // 5  # a fifth of every site's patients is held out (one image each here)
    rng = np.random.default_rng(0)
    images = rng.random((pool, run.image_size, run.image_size), dtype=np.float32)
    labels = rng.integers(0, len(run.class_names), pool)
    config = ModelConfig.from_settings(run)
    model = build_model(config, seed=run.seed)
    inputs = fixed_inputs(model, images)  # on the CPU, as a site computes them, before the model moves
    context_mib = None
    if device.type == "cuda":
        torch.zeros(1, device=device)  # the CUDA context, as a site's process creates it
        free, total = torch.cuda.mem_get_info(device)
        context_mib = (total - free) / 2**20  # device-wide: nothing else should run on the GPU
    model.to(device)
    memory = resolution.PeakMemory(device)
    memory.start()
    unavailable = missing(DP)
    if unavailable:  # the DP step alone, as resolution.py takes it
        what = f"the DP step alone ({', '.join(unavailable)} missing: no round)"
        x = torch.from_numpy(np.ascontiguousarray(inputs[: run.physical_batch_size]))
        x = (x[:, None] if x.dim() == 3 else x).to(device)
        y = torch.from_numpy(labels[: run.physical_batch_size]).to(device)
        step = resolution.dp_step(model, x, y)
        for _ in range(2):
            step()
    else:
        from fedmed.privacy.budget import PrivacyConfig
        from fedmed.privacy.ledger import PrivacyLedger
        from fedmed.protocol import RoundStatus
        from fedmed.train import TrainConfig, TrainingData, evaluate, train_round

        what = "a DP round (`train_round`) and the evaluation of its held-out fifth (`evaluate`)"
        ledger = PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.jsonl")
        result = train_round(
            model,
            TrainingData(inputs[held_out:], labels[held_out:]),
            train=TrainConfig.from_settings(run),
            privacy=PrivacyConfig.from_settings(scenario.site_settings[0], run),
            ledger=ledger,
            site="site-1",
            run_id="gpu-check",
            round_number=1,
        )
        if result.status != RoundStatus.TRAINED:
            raise RuntimeError(f"the round was not trained: {result}")
        evaluate(model, inputs[:held_out], labels[:held_out])
    data: dict = {
        "scenario": str(SCENARIO.relative_to(ROOT)),
        "model": f"{config.frontend} front-end, ResNet-{config.depth}, width {config.width}, {config.image_size} px",
        "site_images": pool,
        "batch": run.batch_size,
        "physical_batch": run.physical_batch_size,
        "local_steps": run.local_steps,
        "measured": what,
        "device": args.device,
    }
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        # Device memory outside torch's allocator at the end: the context, cuDNN's and cuBLAS's
        # handles and workspaces loaded by the round.
        outside = ((total - free) - torch.cuda.memory_reserved(device)) / 2**20
        data["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        data["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
        data["context_mib"] = round(context_mib or 0.0, 1)
        data["outside_torch_mib"] = round(outside, 1)
        per_site = outside + data["peak_reserved_mib"]
        data["per_site_mib"] = round(per_site, 1)
        data["gpu_mib"] = round(total / 2**20)
        data["sites_per_gpu"] = int(data["gpu_mib"] // per_site)
        rows = [
            ("torch's peak allocation (`max_memory_allocated`)", f"{data['peak_allocated_mib']:,.0f} MiB"),
            (
                "torch's peak reservation (`max_memory_reserved`, its caching allocator)",
                f"{data['peak_reserved_mib']:,.0f} MiB",
            ),
            (
                "the CUDA context alone (device memory in use after the first allocation)",
                f"{data['context_mib']:,.0f} MiB",
            ),
            (
                "outside torch's allocator after the round (context, cuDNN and cuBLAS handles and workspaces)",
                f"{data['outside_torch_mib']:,.0f} MiB",
            ),
            ("**one site's process** (outside torch + torch's peak reservation)", f"**{per_site:,.0f} MiB**"),
            (
                f"sites one {data['gpu_mib'] / 1024:.0f} GiB GPU holds by memory",
                f"{data['sites_per_gpu']} (`resources.gpus_per_site` >= {1 / max(data['sites_per_gpu'], 1):.3g})",
            ),
        ]
    else:
        data["peak_rss_growth_mib"] = round(memory.growth_mib(), 1)
        rows = [("peak resident set growth (VmHWM; no GPU)", f"{data['peak_rss_growth_mib']:,.0f} MiB")]
    lines = [
        f"One site of `{data['scenario']}` ({data['model']}; {pool} images, a fifth held out; logical batch "
        f"{run.batch_size} in physical batches of {run.physical_batch_size}; {run.local_steps} local steps): "
        f"{what}, on {args.device}.",
        "",
        "| memory | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    return {"data": data, "markdown": "\n".join(lines)}


CHILD_STEPS = {"facts": step_facts, "throughput": step_throughput, "resolution": step_resolution, "memory": step_memory}


def child(args: argparse.Namespace) -> None:
    """Run one step here; its result is the last line of stdout, as JSON."""
    unavailable = missing(NEEDS[args.child])
    if unavailable:
        result = {"skipped": f"needs {', '.join(unavailable)} (not importable here; carry as wheels)"}
    else:
        try:
            result = CHILD_STEPS[args.child](args)
        except ModuleNotFoundError as exc:  # a dependency's own dependency
            result = {"skipped": f"needs the package of module {exc.name!r} (not importable here)"}
    print(json.dumps(result))


# -- the parent: each step in a child process, with its time limit ------------------------------


def _tail(text: str | bytes | None, lines: int = 6) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = [line for line in (text or "").strip().splitlines() if line.strip()][-lines:]
    return " / ".join(kept)[-1500:] or "(no output)"


def run_step(step: str, args: argparse.Namespace, python: list[str]) -> dict:
    limit = TIME_LIMITS[step]
    start = time.monotonic()
    if step == "tests":
        return run_tests(args, limit, python) | {"seconds": round(time.monotonic() - start, 1)}
    command = [
        *python,
        str(Path(__file__).resolve()),
        "--child",
        step,
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--limit",
        str(limit),
    ] + (["--quick"] if args.quick else [])
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": _pythonpath()}
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"failed": f"timed out after {limit} s; last output: {_tail(exc.stderr)}", "seconds": limit}
    seconds = round(time.monotonic() - start, 1)
    try:
        result = json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"failed": f"exit status {out.returncode}: {_tail(out.stderr)}", "seconds": seconds}
    return result | {"seconds": seconds}


def run_tests(args: argparse.Namespace, limit: int, python: list[str]) -> dict:
    command = [*python, "-m", "pytest", "-q", "tests/test_device.py"]
    shown = "python -m pytest -q tests/test_device.py"
    unavailable = missing(NEEDS["tests"])
    if unavailable:
        return {"skipped": f"needs {', '.join(unavailable)} (not importable here; carry as wheels)", "command": shown}
    env = os.environ | {"PYTHONPATH": _pythonpath()}
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=limit, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        return {"failed": f"timed out after {limit} s; last output: {_tail(exc.stdout)}", "command": shown}
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else "(no output)"
    notes = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED", "E   "))][:20]
    data = {"summary": summary, "exit_status": out.returncode, "notes": notes}
    text = [f"`{shown}`: **{summary}** (exit status {out.returncode})"] + [f"- `{note}`" for note in notes]
    result = {"data": data, "markdown": "\n".join(text), "command": shown}
    if out.returncode not in (0, 5):
        result["failed"] = f"pytest exit status {out.returncode}: {summary}"
    return result


def _pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


STANDALONE = {
    "throughput": ", with the functions of `benchmarks/dp_throughput.py` (its own run: `python "
    "benchmarks/dp_throughput.py --device cuda`)",
    "memory": ", the step's own code (`step_memory` in `benchmarks/gpu_check.py`)",
}
TITLES = {
    "facts": "Machine",
    "tests": "CUDA tests",
    "throughput": "DP-SGD throughput on the device (`benchmarks/dp_throughput.py`'s rounds)",
    "resolution": "Resolution on the device (`benchmarks/resolution.py`)",
    "memory": "Memory per virtual site (`resources.gpus_per_site`)",
}


def report(results: dict[str, dict], args: argparse.Namespace, command: str) -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    lines = [
        f"## GPU (issue 28): `benchmarks/gpu_check.py` on {args.device}",
        "",
        f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit.stdout.strip() or '?'}. "
        "Every table below was produced by this one command (each step in its own process, with its time limit):",
        "",
        "```bash",
        command,
        "```",
    ]
    for step, result in results.items():
        lines += ["", f"### {TITLES[step]}", ""]
        if step != "facts":
            produced = f"`{result['command']}`" if "command" in result else f"step `{step}` of the command above"
            lines += [f"Command: {produced}{STANDALONE.get(step, '')} ({result.get('seconds', '?')} s).", ""]
        if "markdown" in result:
            lines.append(result["markdown"])
        if "skipped" in result:
            lines.append(f"Skipped: {result['skipped']}.")
        if "failed" in result:
            lines.append(f"**Failed**: {result['failed']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (the default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script itself on a CPU")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of torch in each step")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="the steps to run, in order")
    parser.add_argument("--out", type=Path, help="write the Markdown section here (default: stdout)")
    parser.add_argument("--child", choices=tuple(CHILD_STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    shown = " ".join(["python3", "benchmarks/gpu_check.py", *sys.argv[1:]])
    results: dict[str, dict] = {}
    for step in args.steps:
        print(f"gpu_check: {step} (at most {TIME_LIMITS[step]} s)", file=sys.stderr, flush=True)
        results[step] = run_step(step, args, [sys.executable])
        result = results[step]
        state = "failed" if "failed" in result else "skipped" if "skipped" in result else "done"
        print(f"gpu_check: {step} {state} in {result.get('seconds', '?')} s", file=sys.stderr, flush=True)
        shown_now = [result.get("markdown", ""), result.get("skipped", ""), result.get("failed", "")]
        print("\n".join(part for part in shown_now if part), file=sys.stderr, flush=True)
        if args.out:  # after every step, so that a run stopped from outside keeps what it measured
            args.out.write_text(report(results, args, shown))
    if args.out:
        print(f"gpu_check: wrote {args.out}", file=sys.stderr)
    else:
        print(report(results, args, shown))


if __name__ == "__main__":
    main()
