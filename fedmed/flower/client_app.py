"""fedmed's ClientApp: one hospital's side of a round.

It reads the run's settings once, hands the site's work a typed request (validate the
received global model on the site's validation split, then train one private round
through the site's ledger) and replies with the model's arrays and whitelisted scalars
only. The received model is checked against the run's model size before it is
deserialised (``received_model``), in every kind of request; the run's settings are
checked against their bounds (``RunSettings.from_flower``) before anything else.

The work runs in the process that calls the ClientApp: under ``fedmed-client`` that is the
site's long-lived process (``fedmed.deploy.site_runtime``), which hands over its site's
work with ``serve_site``; in a simulation it is a Ray actor that serves many virtual sites.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmed import protocol
from fedmed.config import RunSettings, SiteSettings
from fedmed.flower import records
from fedmed.flower.packing import record_to_vector, vector_to_record
from fedmed.protocol import EvaluateRequest, SiteReply, SiteRequest, TrainRequest
from fedmed.vector import packed_size

if TYPE_CHECKING:
    from fedmed.site.work import SiteWork  # torch: imported only where a site works

app = ClientApp()
_site_work: SiteWork | None = None  # the one SiteWork of a fedmed-client process (serve_site)
_local_work: dict[SiteSettings, SiteWork] = {}  # SiteWork per virtual site of a simulation actor
# A simulation actor serves any of the virtual sites each round; it keeps every site's
# prepared inputs while they fit in this many bytes, dropping the least recently served.
LOCAL_WORK_BYTES = 2 * 2**30


@app.train()
def train(message: Message, context: Context) -> Message:
    run = RunSettings.from_flower(context.run_config)
    if protocol.SECURE in message.content:  # a stage of secure aggregation
        # imported here: a site in a plain run never loads the protocol's code
        from fedmed.flower import secagg_site

        return secagg_site.handle(
            message,
            context,
            run,
            lambda: _do(_train_request(run, message), context),
            _site(context).min_secure_threshold,
        )
    return _reply(_do(_train_request(run, message), context), message)


def _train_request(run: RunSettings, message: Message) -> TrainRequest:
    config = records.record(message.content, protocol.CONFIG, ConfigRecord)
    return TrainRequest(run, received_model(run, message), records.value(config, "round", int))


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    run = RunSettings.from_flower(context.run_config)
    return _reply(_do(EvaluateRequest(run, received_model(run, message)), context), message)


def received_model(run: RunSettings, message: Message) -> np.ndarray:
    """The coordinator's model as a packed vector, refused before it is deserialised or
    hashed unless it is exactly the size of ``run``'s model."""
    return record_to_vector(records.record(message.content, protocol.ARRAYS, ArrayRecord), packed_size(run))


@app.query()
def introduce(message: Message, context: Context) -> Message:
    """The site's name, for a coordinator that has not heard from this site yet."""
    name = str(_site_config(context).get("name", ""))
    return Message(RecordDict({protocol.SITE: ConfigRecord({"name": name})}), reply_to=message)


def serve_site(work: SiteWork) -> None:
    """Answer every message in this process with ``work`` (a ``SiteWork``): the site's
    data and settings stay loaded between rounds."""
    global _site_work
    _site_work = work


def _do(request: SiteRequest, context: Context) -> SiteReply:
    if _site_work is not None:
        return _site_work.handle(request)
    # A simulation's Ray actor: this process is the sites', so it may take the allocator
    # setting that fedmed-client takes at start (fedmed.runtime).
    from fedmed.runtime import keep_freed_memory
    from fedmed.site.work import SiteWork

    keep_freed_memory()
    site = SiteSettings.from_flower(_site_config(context))
    work = _local_work.pop(site, None) or SiteWork(site)
    _local_work[site] = work  # now the most recently served
    reply = work.handle(request)
    while len(_local_work) > 1 and sum(w.held_bytes() for w in _local_work.values()) > LOCAL_WORK_BYTES:
        _local_work.pop(next(iter(_local_work)))
    return reply


def _site(context: Context) -> SiteSettings:
    """This site's settings: those of the process's site, or of a simulation's virtual site."""
    return _site_work.site if _site_work is not None else SiteSettings.from_flower(_site_config(context))


def _site_config(context: Context) -> dict:
    """The site's settings: its SuperNode's node config, or in a simulation the entry of
    the run's site list for this virtual site's partition id."""
    sites = str(context.run_config.get("simulation-sites", ""))
    if sites and "partition-id" in context.node_config:
        return json.loads(sites)[int(context.node_config["partition-id"])]
    return dict(context.node_config)


def _reply(reply: SiteReply, message: Message) -> Message:
    content = RecordDict(
        {
            protocol.METRICS: MetricRecord(reply.metrics),
            protocol.SITE: ConfigRecord({"name": reply.site, "message": reply.message[: protocol.MAX_TEXT]}),
        }
    )
    if reply.model is not None:
        content[protocol.ARRAYS] = vector_to_record(reply.model)
    return Message(content, reply_to=message)
