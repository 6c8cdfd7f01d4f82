"""fedmed's ClientApp: one hospital's side of a round.

It loads the site's data (from the preprocessing cache), checks the incoming global
model, measures it on the site's validation split, trains one private round through
the site's ledger, and replies with the model's arrays and whitelisted scalars only.
"""

from __future__ import annotations

import logging
import time

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmed.flower import protocol
from fedmed.flower.settings import RunSettings, SiteSettings
from fedmed.flower.site_data import load_site_split
from fedmed.model import build_model
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.train import BUDGET_EXHAUSTED, evaluate, train_round
from fedmed.weights import load_state, model_state

log = logging.getLogger("fedmed.site")
app = ClientApp()


@app.train()
def train(message: Message, context: Context) -> Message:
    started = time.perf_counter()
    run = RunSettings.from_run_config(context.run_config)
    site = SiteSettings.from_node_config(context.node_config)
    split = load_site_split(run, site)
    model = build_model(run.model_config())
    load_state(model, arrays_to_state(message.content[protocol.ARRAYS]))
    metrics = validation_metrics(model, split)
    loaded = time.perf_counter()

    round_number = int(message.content[protocol.CONFIG]["round"])
    result = train_round(
        model, split.train_images, split.train_labels, run.train_config(),
        site.privacy_config(run.rounds, run.max_grad_norm), PrivacyLedger(site.ledger),
        site.site, run.run_id, round_number,
    )
    trained = result.status != BUDGET_EXHAUSTED
    metrics.update({
        "status": protocol.TRAINED if trained else protocol.BUDGET_EXHAUSTED,
        "dp": int(result.dp),
        "examples": result.examples,
        "steps": result.steps,
        "loss": protocol.finite_or_nan(result.loss),
        "epsilon": protocol.finite_or_nan(result.epsilon),
        "delta": float(result.delta),
        "noise-multiplier": float(result.noise_multiplier),
        "seconds-setup": loaded - started,
        "seconds-train": time.perf_counter() - loaded,
    })
    content = RecordDict({
        protocol.METRICS: MetricRecord(metrics),
        protocol.SITE: ConfigRecord({"name": site.site, "message": result.message[: protocol.MAX_TEXT]}),
    })
    if trained:
        content[protocol.ARRAYS] = state_to_arrays(model_state(model))
    return Message(content, reply_to=message)


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    run = RunSettings.from_run_config(context.run_config)
    site = SiteSettings.from_node_config(context.node_config)
    split = load_site_split(run, site)
    model = build_model(run.model_config())
    load_state(model, arrays_to_state(message.content[protocol.ARRAYS]))
    content = RecordDict({
        protocol.METRICS: MetricRecord(validation_metrics(model, split)),
        protocol.SITE: ConfigRecord({"name": site.site, "message": ""}),
    })
    return Message(content, reply_to=message)


def validation_metrics(model, split) -> dict[str, float]:
    """The received model on the site's validation split, as whitelisted scalars."""
    if len(split.val) == 0:
        return {"val-examples": 0}
    scores = evaluate(model, split.val_images, split.val_labels)
    return {
        "val-examples": int(len(split.val)),
        "val-loss": protocol.finite_or_nan(scores["loss"]),
        "val-accuracy": protocol.finite_or_nan(scores["accuracy"]),
        "val-balanced-accuracy": protocol.finite_or_nan(scores["balanced_accuracy"]),
        "val-auroc": protocol.finite_or_nan(scores["auroc"]),
        "val-sensitivity": protocol.finite_or_nan(scores.get("sensitivity")),
        "val-specificity": protocol.finite_or_nan(scores.get("specificity")),
    }


def state_to_arrays(state) -> ArrayRecord:
    return ArrayRecord({name: Array(array) for name, array in state.items()})


def arrays_to_state(record: ArrayRecord) -> dict:
    return {name: array.numpy() for name, array in record.items()}
