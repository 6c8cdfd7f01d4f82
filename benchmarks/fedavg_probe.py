"""Quick FedAvg recipe probes on a simulation's exported sites, in one process.

Each virtual site does exactly what a fedmed site does in a round (``SiteWork.train``: its
DICOM data, its own ledger, DP-SGD at its own budget), and the server step is fedmed's
(``weighted_average`` then ``server_step``), but without Flower's processes in between, so
a round costs only the sites' training. Use it to search settings; confirm a recipe with
``fedmed-simulate`` (BENCHMARKS.md gives the commands).

    fedmed-simulate simulations/pneumonia-5-sites.toml --set data.path=... --out /tmp/pn
    python benchmarks/fedavg_probe.py /tmp/pn/data --rounds 20 --width 8 --server-lr 2

Prints one JSON line per round: the held-out test AUROC of the global model (and of the
average of global models when --model-average is set), balanced accuracy and epsilon.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path

from fedmed.config import RunSettings, SiteSettings
from fedmed.flower.coordinator import load_server_eval
from fedmed.flower.fedavg import SiteUpdate, server_step, weighted_average
from fedmed.flower.packing import pack, unpack
from fedmed.flower.site_work import SiteWork
from fedmed.model import ModelConfig, build_model
from fedmed.runtime import keep_freed_memory
from fedmed.train import evaluate
from fedmed.weights import load_state, model_state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path, help="a fedmed-simulate output's data folder (sites/ and test/)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--server-momentum", type=float, default=0.0)
    p.add_argument("--model-average", type=float, default=0.0, help="decay of an average of global models")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epsilon", type=float, default=8.0, help="each site's budget; 0 for non-private")
    args = p.parse_args()
    logging.disable(logging.WARNING)  # every non-private round warns; the probe says so once
    work = Path(tempfile.mkdtemp(prefix="fedavg-probe-"))
    run = RunSettings(run_dir=str(work), run_id=f"probe-{uuid.uuid4().hex[:8]}", rounds=args.rounds,
                      width=args.width, batch_size=args.batch_size, physical_batch_size=args.batch_size,
                      learning_rate=args.learning_rate, momentum=args.momentum, server_learning_rate=args.server_lr,
                      server_momentum=args.server_momentum, server_eval_data=str(args.data / "test"))
    sites = [SiteWork(SiteSettings(data=str(folder), name=folder.name, ledger=str(work / f"{folder.name}.jsonl"),
                                   max_epsilon=args.epsilon or 1.0,
                                   dp=args.epsilon > 0))
             for folder in sorted((args.data / "sites").iterdir()) if folder.is_dir()]
    keep_freed_memory()  # as a site's worker does
    model = build_model(ModelConfig.from_settings(run), seed=run.seed)
    state, velocity, average = model_state(model), None, None
    test = load_server_eval(run)
    for round_number in range(1, args.rounds + 1):
        started = time.monotonic()
        updates, epsilons = [], []
        for site in sites:
            reply = site.train(run, pack(state), round_number)
            updates.append(SiteUpdate(reply.site, int(reply.metrics["examples"]), unpack(reply.model, state)))
            epsilons.append(reply.metrics["epsilon"])
        state, velocity = server_step(state, weighted_average(updates), velocity, args.server_lr, args.server_momentum)
        line = {"round": round_number}
        if args.model_average:
            average = state if average is None else {
                k: (args.model_average * average[k] + (1 - args.model_average) * v).astype(v.dtype)
                for k, v in state.items()}
            load_state(model, average)
            line["average_auroc"] = round(evaluate(model, *test)["auroc"], 4)
        load_state(model, state)
        scores = evaluate(model, *test)
        line.update(auroc=round(scores["auroc"], 4), balanced_accuracy=round(scores["balanced_accuracy"], 3),
                    max_epsilon=round(max(epsilons), 3), seconds=round(time.monotonic() - started, 1))
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
