"""The coordinator's round loop on Flower's Grid: wait for sites, sample them, play the
round (``fedmed.flower.rounds``: in clear or under secure aggregation), take the server's
step, checkpoint and record.

What is not about Flower lives in ``fedmed.coordinator``: checking replies
(``replies.check_reply``), aggregation, the records (``recorder.RunRecorder``), site
identities, the starting model and the held-out set.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedmed import protocol
from fedmed.config import RunSettings
from fedmed.coordinator.fedavg import server_step, validate_update
from fedmed.coordinator.held_out import evaluate_held_out, load_server_eval
from fedmed.coordinator.identities import SiteNames
from fedmed.coordinator.initial_model import load_initial_model
from fedmed.coordinator.outcome import RoundOutcome
from fedmed.coordinator.recorder import RunRecorder
from fedmed.coordinator.replies import Accepted, check_evaluation, check_reply
from fedmed.device import resolve_device
from fedmed.flower.packing import vector_to_record
from fedmed.flower.replies import FlowerReply
from fedmed.flower.rounds import PlainRound, RoundKind, SecureRound
from fedmed.model import ModelConfig, build_model, trained_parameter_count
from fedmed.protocol import RoundStatus
from fedmed.rundir import RunDirectory
from fedmed.vector import pack
from fedmed.weights import model_state

log = logging.getLogger("fedmed.coordinator")
REJOIN_GRACE = 60.0  # seconds a resumed run waits for the sites of its last round to register again
INTRODUCTION_TIMEOUT = 10.0  # seconds to wait for new sites to say their names

State = dict[str, np.ndarray]


class FederatedRun:
    def __init__(self, grid: Grid, run: RunSettings, poll_interval: float = 0.05) -> None:
        self.grid = grid
        self.run = run
        self.poll_interval = poll_interval
        self.run_dir = RunDirectory(run.run_dir)
        self.names = SiteNames(self.run_dir.identities())
        self.recorder = RunRecorder(run, self.run_dir)
        self.kind: RoundKind = SecureRound() if run.secure_aggregation else PlainRound()
        self.initial_model: dict | None = None  # where round 1's weights came from, if not random
        self.model = build_model(ModelConfig.from_settings(run), seed=run.seed)
        self.reference = model_state(self.model)
        self.trained_parameters = trained_parameter_count(ModelConfig.from_settings(run))
        self.model.to(resolve_device(self.run_dir.device()))  # scores the held-out set there
        self.server_eval = load_server_eval(run, self.model)
        self.velocity: State | None = None  # server momentum (FedAvgM)
        self.returning = 0  # on a resume: how many sites trained the last recorded round
        self.introduced: set[int] = set()  # nodes asked for their names

    def execute(self) -> str:
        """Run the remaining rounds; returns the final phase ("completed" or "stopped")."""
        try:
            return self.rounds()
        finally:
            self.recorder.close()

    def rounds(self) -> str:
        state, first = self.starting_point()
        nodes = self._wait_for_sites(first, rejoin=True)
        rounds_done = first - 1
        for round_number in range(first, self.run.rounds + 1):
            nodes = self.available_nodes()
            if len(nodes) < self.run.min_sites:
                # A round with fewer sites than min_sites would be paid for and discarded.
                log.warning(
                    "round %d: %d sites connected, fewer than the minimum of %d; waiting for sites "
                    "before asking any to train",
                    round_number,
                    len(nodes),
                    self.run.min_sites,
                )
                nodes = self._wait_for_sites(round_number, rejoin=False)
            self._learn_names(nodes)  # once per site and registration: not part of the round
            started = time.monotonic()
            chosen = self._sample(nodes, round_number)
            self.recorder.status("training", round_number, connected=len(nodes), asked=len(chosen))
            outcome, combined = self.kind.play(self, round_number, chosen, state)
            self.recorder.validation(round_number - 1, outcome.site_metrics)
            aggregated = combined is not None
            if combined is not None:
                state, self.velocity = server_step(
                    state, combined, self.velocity, self.run.server_learning_rate, self.run.server_momentum
                )
            else:
                log.warning(
                    "round %d: %d valid updates, fewer than the minimum of %d sites; "
                    "the global model is kept unchanged",
                    round_number,
                    len(outcome.trained),
                    self.run.min_sites,
                )
            self.run_dir.save_checkpoint(round_number, state, self.velocity)
            rounds_done = round_number
            held_out = (
                evaluate_held_out(self.model, state, self.server_eval)
                if self.server_eval is not None and self.run.evaluates(round_number)
                else None
            )
            self.recorder.round(round_number, outcome, aggregated, time.monotonic() - started, held_out)
            if not outcome.trained and outcome.budget_exhausted and not outcome.failed and not outcome.missing:
                log.warning("every site that answered has exhausted its privacy budget; stopping")
                self.recorder.final_model(state, rounds_done, self.initial_model)
                self.recorder.status("stopped", round_number, reason="every site's privacy budget is exhausted")
                return "stopped"
        self._final_validation(state, rounds_done)
        self.recorder.final_model(state, rounds_done, self.initial_model)
        self.recorder.status("completed", rounds_done)
        return "completed"

    # -- where the run starts ------------------------------------------------------------

    def starting_point(self) -> tuple[dict[str, np.ndarray], int]:
        if self.run.start_round == 1 and self.run.initial_model:
            state, self.initial_model = load_initial_model(self.run)
            log.info("starting from the initial model %s", self.initial_model["source"])
            return state, 1
        if self.run.start_round == 1:
            return self.reference, 1
        checkpoint = self.run_dir.last_checkpoint()
        if checkpoint is None or checkpoint[0] != self.run.start_round - 1:
            found = "none" if checkpoint is None else f"round {checkpoint[0]}"
            raise RuntimeError(
                f"cannot resume at round {self.run.start_round}: it needs the checkpoint of "
                f"round {self.run.start_round - 1} in {self.run_dir.path}, found {found}"
            )
        problems = validate_update(checkpoint[1], 1, self.reference)
        if problems:
            raise RuntimeError(f"checkpoint of round {checkpoint[0]} does not fit the model: {'; '.join(problems)}")
        log.info("resuming at round %d from the checkpoint of round %d", self.run.start_round, checkpoint[0])
        if self.run.initial_model:  # for the model card: round 1 started from it
            try:
                self.initial_model = load_initial_model(self.run)[1]
            except (OSError, ValueError) as exc:
                self.initial_model = {"source": self.run.initial_model, "note": f"not readable at resume: {exc}"}
        self.velocity = self.run_dir.server_velocity(checkpoint[0])
        if self.run.server_momentum and self.velocity is None:
            log.warning(
                "no server velocity saved with the checkpoint of round %d; server momentum restarts from zero",
                checkpoint[0],
            )
        for record in self.run_dir.metrics():
            for name, site in record.get("sites", {}).items():
                self.recorder.remember_site(name, site)
            if record.get("event") == "round":
                self.returning = len(record.get("trained", []))
        for record in self.run_dir.received():
            self.names.remember(int(record["node_id"]), str(record["site"]))
        return checkpoint[1], self.run.start_round

    def _wait_for_sites(self, round_number: int, rejoin: bool) -> list[int]:
        """Wait for ``min_sites`` sites before ``round_number``. With ``rejoin`` (a run's
        start): a resumed run's SuperLink starts afresh and the sites register again one by
        one, so the sites of the last recorded round get up to ``REJOIN_GRACE`` seconds to
        come back before it starts with fewer."""
        started = time.monotonic()
        deadline = started + self.run.site_wait_timeout
        while True:
            nodes = self.available_nodes()
            self.recorder.status("waiting", round_number, connected=len(nodes))
            rejoining = rejoin and time.monotonic() < started + REJOIN_GRACE
            if len(nodes) >= max(self.run.min_sites, self.returning if rejoining else 0):
                log.info("%d sites connected (minimum %d)", len(nodes), self.run.min_sites)
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} of the minimum {self.run.min_sites} sites connected "
                    f"within {self.run.site_wait_timeout:.0f} s"
                )
            time.sleep(0.5)

    # -- talking to sites ------------------------------------------------------------------

    def _learn_names(self, nodes: list[int]) -> None:
        """Ask sites not heard from yet for their names (a query message, answered with the
        name only), so that a site which drops out before its first reply is still named.
        Node ids change when a site registers again, e.g. with a restarted coordinator."""
        unknown = [node for node in nodes if not self.names.known(node) and node not in self.introduced]
        if not unknown:
            return
        self.introduced.update(unknown)
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in unknown]
        replies, _, _ = self.exchange(messages, timeout=INTRODUCTION_TIMEOUT)
        for node, reply in replies.items():
            if not reply.has_error() and protocol.SITE in reply.content:
                self.names.claim(node, reply.content[protocol.SITE].get("name", ""))

    def available_nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def _sample(self, nodes: list[int], round_number: int) -> list[int]:
        count = max(self.run.min_sites, math.ceil(self.run.fraction_train * len(nodes)))
        if count >= len(nodes):
            return list(nodes)
        rng = np.random.default_rng([self.run.seed, round_number])
        return sorted(int(n) for n in rng.choice(nodes, size=count, replace=False))

    def message(self, kind: str, node: int, state: State, round_number: int) -> Message:
        content = RecordDict(
            {
                protocol.ARRAYS: vector_to_record(pack(state)),
                protocol.CONFIG: ConfigRecord({"round": round_number}),
            }
        )
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(round_number))

    def exchange(
        self, messages: list[Message], timeout: float | None = None
    ) -> tuple[dict[int, Message], list[int], dict[int, float]]:
        """Send, then collect replies until all are in or the timeout (default: the round's) passes.
        Returns each node's reply, the nodes that did not answer, and each answer's seconds.
        (A reply is matched to the node it was sent to: Flower's own error replies, e.g.
        "node unavailable", do not come from the site.)"""
        sent = time.monotonic()
        destinations = {}
        for message_id, message in zip(self.grid.push_messages(messages), messages):
            destinations[message_id] = message.metadata.dst_node_id
        waiting = set(destinations)
        replies: dict[int, Message] = {}
        arrivals: dict[int, float] = {}
        deadline = sent + (self.run.round_timeout if timeout is None else timeout)
        while waiting and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(waiting):
                node = destinations[reply.metadata.reply_to_message_id]
                waiting.discard(reply.metadata.reply_to_message_id)
                replies[node] = reply
                arrivals[node] = time.monotonic() - sent
            if waiting:
                time.sleep(self.poll_interval)
        return replies, [destinations[m] for m in waiting], arrivals

    def collect(
        self,
        round_number: int,
        replies: dict[int, Message],
        missing: list[int],
        arrivals: dict[int, float] | None = None,
    ) -> RoundOutcome:
        """Every reply of a training round checked (``check_reply``), recorded as received,
        and sorted into the round's outcome."""
        outcome = RoundOutcome(missing=[self.names.name(n) for n in missing])
        for node, reply in replies.items():
            if reply.has_error():
                outcome.failed[self.names.name(node)] = str(reply.error.reason)[:300]
                continue
            view = FlowerReply(reply)
            name = self.names.claim(node, view.text().get("name"))
            checked = check_reply(self.run, self.reference, view, self.kind.updates)
            self.recorder.received(round_number, node, name, view, node in self.names.bound)
            if not isinstance(checked, Accepted):
                outcome.rejected[name] = checked.reason
                log.warning("round %d: update of %s dropped: %s", round_number, name, checked.reason)
                continue
            outcome.site_metrics[name] = checked.metrics
            if checked.metrics.get("status") == RoundStatus.BUDGET_EXHAUSTED:
                outcome.budget_exhausted.append(name)
            else:
                self.kind.updates.keep(outcome, node, name, checked)
        for name, reason in outcome.failed.items():
            log.warning("round %d: site %s failed: %s", round_number, name, reason)
        if outcome.missing:
            log.warning(
                "round %d: no reply within %.0f s from %s",
                round_number,
                self.run.round_timeout,
                ", ".join(outcome.missing),
            )
        outcome.reply_seconds = {self.names.name(node): t for node, t in (arrivals or {}).items()}
        return outcome

    def _final_validation(self, state: State, rounds_done: int) -> None:
        nodes = self.available_nodes()
        self.recorder.status("evaluating", rounds_done, connected=len(nodes))
        replies, _, _ = self.exchange([self.message(MessageType.EVALUATE, n, state, rounds_done) for n in nodes])
        metrics = {}
        for node, reply in replies.items():
            if reply.has_error():
                continue
            view = FlowerReply(reply)
            name = self.names.claim(node, view.text().get("name"))
            checked = check_evaluation(self.run, view)
            self.recorder.received(rounds_done, node, name, view, node in self.names.bound)
            if isinstance(checked, Accepted):
                metrics[name] = checked.metrics
        self.recorder.validation(rounds_done, metrics)
