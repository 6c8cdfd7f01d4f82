"""Quick FedAvg recipe probes of a scenario, in one process.

Each virtual site does exactly what a fedmed site does in a round (``SiteWork.train``: its
DICOM data, its own ledger, DP-SGD at its own budget), and the server step is fedmed's
(``aggregate_round``: updates bounded, then combined; then ``server_step``), but without Flower's processes in between, so
a round costs only the sites' training. A scenario with a [pretrain] section starts from
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

from fedmed.coordinator.aggregation import aggregate_round
from fedmed.coordinator.fedavg import SiteUpdate, server_step
from fedmed.coordinator.held_out import load_server_eval
from fedmed.model import ModelConfig, build_model
from fedmed.runtime import keep_freed_memory
from fedmed.simulate.baselines import starting_state
from fedmed.simulate.pretrained import pretrained_model
from fedmed.simulate.scenario import load_scenario
from fedmed.simulate.sites import prepare_sites
from fedmed.site.work import SiteWork, validation_metrics
from fedmed.train import evaluate
from fedmed.vector import pack, unpack
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
    state, velocity = starting_state(run), None  # --set data.initial_model=MODEL: a public pre-trained start
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    test = load_server_eval(run, model)
    averages: dict[float, dict] = {}
    for round_number in range(1, run.rounds + 1):
        started = time.monotonic()
        updates, reports, epsilons, norms, bound = [], [], [], {}, None
        for site in sites:
            reply = site.train(run, pack(state), round_number)
            if reply.model is not None:
                updates.append(SiteUpdate(reply.site, int(reply.metrics["examples"]), unpack(reply.model, state)))
                reports.append(reply.metrics)
                norms[reply.site] = round(float(np.linalg.norm(reply.model.astype(np.float64) - pack(state))), 3)
            epsilons.append(reply.metrics["epsilon"])
        if updates:
            combined, bounded = aggregate_round(run, round_number, state, updates, reports=reports,
                                                trained_parameters=trainable)
            bound = round(bounded.norm_bound, 3) if np.isfinite(bounded.norm_bound) else None
            state, velocity = server_step(state, combined, velocity, run.server_learning_rate, run.server_momentum)
        load_state(model, state)
        scores = evaluate(model, *test)
        ema_scores = {}
        for decay in decays:
            old = averages.get(decay)
            averages[decay] = {k: (decay * old[k] + (1 - decay) * v if old is not None and v.dtype.kind == "f" else v)
                               for k, v in state.items()}
            load_state(model, averages[decay])
            s = evaluate(model, *test)
            ema_scores[str(decay)] = [round(s["auroc"], 4), round(s["balanced_accuracy"], 3)]
        load_state(model, state)
        print(json.dumps({"round": round_number, "auroc": round(scores["auroc"], 4),
                          "balanced_accuracy": round(scores["balanced_accuracy"], 3), "ema": ema_scores,
                          "max_epsilon": round(max(epsilons), 3), "update_norms": norms, "norm_bound": bound,
                          "seconds": round(time.monotonic() - started, 1)}), flush=True)
    print(json.dumps({"site_val_auroc": {site.site.name: round(validation_metrics(model, site.inputs(run, model))["val-auroc"], 4)
                                         for site in sites}}), flush=True)


if __name__ == "__main__":
    main()
