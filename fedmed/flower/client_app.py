"""fedmed's ClientApp: one hospital's side of a round.

It hands the received global model and the run's settings to the site's work (validate
the model on the site's validation split, then train one private round through the
site's ledger) and replies with the model's arrays and whitelisted scalars only.

Under ``fedmed-client`` the work runs in the site's long-lived worker (node config
``worker``); elsewhere, e.g. in a simulation, it runs in this process.
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmed.flower import protocol
from fedmed.flower.packing import record_to_vector, vector_to_record
from fedmed.flower.protocol import SiteReply
from fedmed.flower.site_worker import ask_worker, handle_request

app = ClientApp()
_local_work: dict[tuple, object] = {}  # node config -> SiteWork, for in-process use


@app.train()
def train(message: Message, context: Context) -> Message:
    request = {"kind": "train", "run_config": dict(context.run_config),
               "model": record_to_vector(message.content[protocol.ARRAYS]),
               "round": int(message.content[protocol.CONFIG]["round"])}
    return _reply(_do(request, context), message)


@app.evaluate()
def evaluate_global(message: Message, context: Context) -> Message:
    request = {"kind": "evaluate", "run_config": dict(context.run_config),
               "model": record_to_vector(message.content[protocol.ARRAYS])}
    return _reply(_do(request, context), message)


def _do(request: dict, context: Context) -> SiteReply:
    worker = str(context.node_config.get("worker", ""))
    if worker:
        return ask_worker(worker, request)
    from fedmed.flower.settings import SiteSettings
    from fedmed.flower.site_work import SiteWork

    key = tuple(sorted((k, str(v)) for k, v in context.node_config.items()))
    if key not in _local_work:
        _local_work.clear()  # one site per process at a time; drop the previous site's data
        _local_work[key] = SiteWork(SiteSettings.from_node_config(context.node_config))
    return handle_request(_local_work[key], request)


def _reply(reply: SiteReply, message: Message) -> Message:
    content = RecordDict({
        protocol.METRICS: MetricRecord(reply.metrics),
        protocol.SITE: ConfigRecord({"name": reply.site, "message": reply.message[: protocol.MAX_TEXT]}),
    })
    if reply.model is not None:
        content[protocol.ARRAYS] = vector_to_record(reply.model)
    return Message(content, reply_to=message)
