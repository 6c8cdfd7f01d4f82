"""``fedmed-client``'s site runtime: one long-lived process serves every round's ClientApp task.

Flower's SuperNode, started with ``--isolation process``, stores each message from the
coordinator as a task on its local runtime API and waits for a process to acquire it;
by default Flower would start a fresh ``flwr-clientapp`` process, with a second of
imports, for every message. fedmed's site process acquires the tasks itself instead. It
keeps torch, the model code and the site's data loaded, so a round costs its training
and little else (BENCHMARKS.md, "Round overhead").

Only the holder of the site's secret (a file only the site's user can read) may acquire
tasks. The runtime serves fedmed's own ClientApp only: a task of a run submitted with any
other app gets an error reply and never reaches the site's data, and no code from the
run's app bundle is ever imported. With a pinned coordinator key (``site.coordinator_key``)
it serves only runs whose settings that coordinator signed (``fedmed.run_signing``); any
other run is refused the same way, before the ClientApp sees it. A failure in one round becomes that round's error
reply and a failed task; the next round is served as usual.

This module imports Flower's runtime internals: entry points check the installed Flower
release first (``fedmed.flower.waits.check_flower``, as ``fedmed-client`` does).
"""

from __future__ import annotations

import io
import logging
import math
import secrets
import sys
import threading
import zipfile
from pathlib import Path

import httpx
from flwr.app import ConfigRecord, Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    SendTaskHeartbeatRequest,
)
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedmed import protocol
from fedmed.config import RunSettings, SiteSettings, tomllib
from fedmed.deploy.launch import APP_COMPONENTS
from fedmed.flower import records
from fedmed.flower.waits import shorten_object_retries
from fedmed.run_signing import RunRefused, check_run

log = logging.getLogger("fedmed.site")

POLL = 0.05  # seconds between asks for a new task when there is none
SECRET_NAME = "runtime.secret"
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"


def write_secret(state_dir: Path) -> Path:
    """A fresh random secret for acquiring this site's tasks, readable by its user only."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = state_dir / SECRET_NAME
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    path.write_bytes(secrets.token_bytes(32))
    return path


class ForeignAppError(RuntimeError):
    """The task's run was submitted with an app other than fedmed's."""


class SiteRuntime:
    """Acquires the ClientApp tasks of one SuperNode and answers them with ``app``, one at a time."""

    def __init__(self, address: str, secret: bytes, app: ClientApp, site: SiteSettings | None = None) -> None:
        self.address = address  # the SuperNode's runtime API, host:port
        self.app = app
        self.site = site  # whose pinned coordinator key and federation decide which runs are served
        self._stop = threading.Event()
        self._acquirer = RuntimeHttpClient.from_server_address(
            address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={_ACQUIRE}),
            ],
        )
        self._thread = threading.Thread(target=self._serve, name="fedmed-site-runtime", daemon=True)
        shorten_object_retries()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop acquiring tasks; a task being served is finished first (up to ``timeout``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._acquirer.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            token = self._acquire()
            if token:
                self.serve_task(token)
            else:
                self._stop.wait(POLL)

    def _acquire(self) -> str | None:
        try:
            answer = self._acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except httpx.HTTPError:
            return None  # the SuperNode is starting or restarting
        return answer.token if answer.HasField("task") and answer.token else None

    def serve_task(self, token: str) -> None:
        """Pull one task's message, answer it with the ClientApp, push the reply and the task's end."""
        client = RuntimeHttpClient.from_server_address(
            self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
        )
        heartbeat = HeartbeatSender(_heartbeat(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        status, details = SubStatus.FAILED, "the task failed before its message arrived"
        try:
            task = client.PullTaskInput(PullTaskInputRequest())
            context = context_from_proto(task.context)
            message = _pull_message(client, context)
            _check_app(fab_from_proto(task.fab).content)
            self.check_run(context)
            reply = self.app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
            _print_round(message, reply)
        except (ForeignAppError, RunRefused) as error:  # a run this site never agreed to serve
            details = f"{type(error).__name__}: {error}"
            log.warning("refused a task: %s", error)
            print(f"refused: {error}; nothing was read or spent", file=sys.stderr, flush=True)
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details[:1000]), reply_to=message
                )
        except Exception as error:  # the coordinator gets this round's error; the site goes on
            details = f"{type(error).__name__}: {error}"
            log.exception("a round's work failed")
            print(f"error: the site's work for this message failed: {details}", file=sys.stderr, flush=True)
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details[:1000]), reply_to=message
                )
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as error:  # noqa: BLE001 - the SuperNode may have dropped the task
                print(f"error: could not hand the reply to the SuperNode: {error}", file=sys.stderr, flush=True)
            push_task_output(client, context, status, details)
            heartbeat.stop()
            client.close()

    def check_run(self, context: Context) -> None:
        """Refuse a run the site's pinned coordinator did not sign (``RunRefused``)."""
        if self.site is None or not self.site.coordinator_key:
            return
        try:
            run = RunSettings.from_flower(context.run_config)
        except ValueError as error:
            raise RunRefused(f"the run's settings are not fedmed's ({error})") from error
        check_run(run, Path(self.site.coordinator_key), self.site.federation_name)


def _heartbeat(client: RuntimeHttpClient):
    """Tell the SuperNode the task is alive (about every 20 s, from Flower's sender thread).
    A refusal means the task was dropped: pushing its reply will then fail, and is reported."""

    def beat() -> bool:
        try:
            client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False
        return True

    return beat


def _pull_message(client: RuntimeHttpClient, context: Context) -> Message:
    answer = client.PullMessages(PullAppMessagesRequest())
    if not answer.messages_list:
        raise RuntimeError("the SuperNode announced a task without a message")
    tree = answer.message_object_trees[0]
    node = Node(node_id=context.node_id)
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message,
    )
    message.metadata.__dict__["_message_id"] = tree.object_id  # a pulled message does not carry its own id
    return message


def _check_app(fab: bytes) -> None:
    """Refuse a run whose app bundle does not name fedmed's ClientApp."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as bundle:
            spec = tomllib.loads(bundle.read("pyproject.toml").decode("utf-8"))
        components = spec["tool"]["flwr"]["app"]["components"]
    except (KeyError, ValueError, zipfile.BadZipFile, tomllib.TOMLDecodeError) as error:
        raise ForeignAppError(f"the run's app bundle is not a fedmed run ({error})") from error
    if components.get("clientapp") != APP_COMPONENTS["clientapp"]:
        raise ForeignAppError(
            f"the run asks for ClientApp {components.get('clientapp')!r}; this site serves "
            f"fedmed's only ({APP_COMPONENTS['clientapp']})"
        )


def _print_round(message: Message, reply: Message) -> None:
    if message.metadata.message_type != "train" or protocol.METRICS not in reply.content:
        return
    round_number = records.value(records.record(message.content, protocol.CONFIG, ConfigRecord), "round", int)
    epsilon = reply.content[protocol.METRICS].get("epsilon", math.nan)
    note = str(reply.content[protocol.SITE].get("message", "")) if protocol.SITE in reply.content else ""
    print(
        f"round {round_number}: {note or 'trained'}; epsilon spent "
        f"{float(epsilon) if isinstance(epsilon, (int, float)) else math.nan:.3f}",
        flush=True,
    )
