"""Quick FedAvg recipe probes of a scenario, in one process.

The rounds are fedmed's, in one process (``fedmed.simulate.in_process``): each virtual site
does exactly what a fedmed site does, and the server step is fedmed's, without Flower's
processes in between, so a round costs only the sites' training. A scenario with a [pretrain] section starts from
its public model, pre-trained once as fedmed-simulate does (or give --set
data.initial_model=MODEL). Use it to search settings; confirm a recipe with
``fedmed-simulate`` and the same ``--set`` overrides (BENCHMARKS.md gives the commands).

    python benchmarks/fedavg_probe.py simulations/pneumonia-5-sites.toml \\
        --set data.path=../shared/data/pneumoniamnist.npz --set model.frontend=scattering

Prints one JSON line per round (held-out test AUROC and balanced accuracy of the global
model, the sites' largest epsilon, each update's norm and the round's norm bound) and, at the end, each site's validation AUROC.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from fedmed.coordinator.held_out import load_server_eval
from fedmed.model import ModelConfig, build_model
from fedmed.runtime import keep_freed_memory
from fedmed.simulate.baselines import starting_state
from fedmed.simulate.in_process import RoundView, run_rounds
from fedmed.simulate.pretrained import pretrained_model
from fedmed.simulate.scenario import load_scenario
from fedmed.simulate.sites import prepare_sites
from fedmed.site.work import SiteWork, validation_metrics
from fedmed.train import evaluate
from fedmed.vector import pack
from fedmed.weights import load_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", type=Path, help="a fedmed-simulate scenario file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a scenario setting, as fedmed-simulate --set")
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "fedmed-probe-data",
                   help="where the sites' DICOM folders are written (reused when they match)")
    p.add_argument("--ema", default="", help="comma-separated decays: also score an EMA of the global models")
    args = p.parse_args()
    decays = [float(d) for d in args.ema.split(",") if d]
    logging.disable(logging.WARNING)  # every non-private round warns
    scenario = load_scenario(args.scenario, args.overrides)
    data = prepare_sites(scenario, args.data)
    if scenario.pretrain.data and not scenario.run.initial_model:  # as fedmed-simulate: start from the public model
        public = pretrained_model(scenario, args.data.parent / "fedmed-probe-public")
        scenario = dataclasses.replace(scenario, run=dataclasses.replace(scenario.run, initial_model=str(public)))
    work = Path(tempfile.mkdtemp(prefix="fedavg-probe-"))
    run = dataclasses.replace(scenario.run, run_dir=str(work), run_id=f"probe-{uuid.uuid4().hex[:8]}",
                              server_eval_data=str(data.test_dir))
    sites = [SiteWork(dataclasses.replace(settings, name=name, data=str(folder), ledger=str(work / name / "ledger.jsonl")))
             for name, folder, settings in zip(data.names, data.site_dirs, scenario.site_settings)]
    keep_freed_memory()  # as a site's worker does
    model = build_model(ModelConfig.from_settings(run), seed=run.seed)
    test = load_server_eval(run, model)
    averages: dict[float, dict] = {}
    started = time.monotonic()

    def report(view: RoundView) -> None:
        nonlocal started
        before = pack(view.previous).astype(np.float64)
        norms = {r.site: round(float(np.linalg.norm(r.model.astype(np.float64) - before)), 3)
                 for r in view.replies if r.model is not None}
        load_state(model, view.state)
        scores = evaluate(model, *test)
        ema_scores = {}
        for decay in decays:
            old = averages.get(decay)
            averages[decay] = {k: (decay * old[k] + (1 - decay) * v if old is not None and v.dtype.kind == "f" else v)
                               for k, v in view.state.items()}
            load_state(model, averages[decay])
            s = evaluate(model, *test)
            ema_scores[str(decay)] = [round(s["auroc"], 4), round(s["balanced_accuracy"], 3)]
        load_state(model, view.state)
        print(json.dumps({"round": view.number, "auroc": round(scores["auroc"], 4),
                          "balanced_accuracy": round(scores["balanced_accuracy"], 3), "ema": ema_scores,
                          "max_epsilon": round(max(r.metrics["epsilon"] for r in view.replies), 3),
                          "update_norms": norms,
                          "norm_bound": None if view.norm_bound is None else round(view.norm_bound, 3),
                          "seconds": round(time.monotonic() - started, 1)}), flush=True)
        started = time.monotonic()

    run_rounds(run, sites, starting_state(run), report)
    print(json.dumps({"site_val_auroc": {site.site.name: round(validation_metrics(model, site.inputs(run, model))["val-auroc"], 4)
                                         for site in sites}}), flush=True)


if __name__ == "__main__":
    main()
