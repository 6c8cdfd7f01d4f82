"""The coordinator's round loop on Flower's Grid: sample sites, check replies, FedAvg, record.

Every reply is checked before anything of it is used: only the expected records, only
whitelisted scalars, and arrays with exactly the model's names, shapes and dtypes and
finite values. A bad reply is dropped for that round with its reason in the records.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedmed.config import PRIVACY_UNITS, RunSettings
from fedmed import protocol
from fedmed.flower import secagg
from fedmed.coordinator.aggregation import (aggregate_round, apply_move, round_norm_bound, scale_to_bound, state_norm,
                                       weight_cap)
from fedmed.flower.secagg_coordinator import SecureRoundFailed, SecureSum
from fedmed.coordinator.fedavg import SiteUpdate, server_step, validate_update
from fedmed.coordinator.initial_model import load_initial_model
from fedmed.coordinator.model_card import model_card, model_card_markdown
from fedmed.flower.packing import check_declared, record_to_vector, vector_to_record
from fedmed.vector import pack, unpack
from fedmed.protocol import RoundStatus
from fedmed.coordinator.results import RunResults
from fedmed.rundir import RunDirectory
from fedmed.model import ModelConfig, build_model, fixed_inputs, trained_parameter_count
from fedmed.privacy.release import counts_length, score_errors, scores_from_counts
from fedmed.weights import load_state, model_state

log = logging.getLogger("fedmed.coordinator")
REJOIN_GRACE = 60.0  # seconds a resumed run waits for the sites of its last round to register again
INTRODUCTION_TIMEOUT = 10.0  # seconds to wait for new sites to say their names
SECURE_STAGE_TIMEOUT = 60.0  # seconds to wait for secure aggregation's key and share stages (milliseconds of work)


@dataclass
class RoundOutcome:
    """What happened to every site asked to take part in one round."""

    updates: list[SiteUpdate] = field(default_factory=list)
    budget_exhausted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # the sites whose updates are in the aggregate
    examples: float = 0.0  # their summed (capped, under secure aggregation) record counts
    masked: dict[int, np.ndarray] = field(default_factory=dict)  # secure aggregation: node -> masked vector
    secure: dict | None = None  # secure aggregation: threshold, sites summed, dropouts, failure
    clipped: dict[str, str] = field(default_factory=dict)  # updates bounded before aggregation, with why
    norm_bound: float = math.inf  # the round's bound on one update's norm
    site_metrics: dict[str, dict] = field(default_factory=dict)
    reply_seconds: dict[str, float] = field(default_factory=dict)  # from sending to the reply's arrival


MAX_VALIDATION_NOISE = 1e6  # std per count a site may state; more says nothing but costs the error bars

class FederatedRun:
    def __init__(self, grid: Grid, run: RunSettings, poll_interval: float = 0.05) -> None:
        self.grid = grid
        self.run = run
        self.poll_interval = poll_interval
        self.run_dir = RunDirectory(run.run_dir)
        self.names: dict[int, str] = {}  # node id -> site name, learnt from replies
        self.bound = self.run_dir.identities()  # node id -> the name its key was registered under
        self.sites: dict[str, dict] = {}  # per-site summary for the model card
        self.last_validation: dict | None = None  # sites' weighted validation of the latest model
        self.last_held_out: dict | None = None  # the latest evaluation on the coordinator's own data
        self.initial_model: dict | None = None  # where round 1's weights came from, if not random
        self.results = RunResults(self.run_dir)  # metrics.csv and TensorBoard
        self.model = build_model(ModelConfig.from_settings(run), seed=run.seed)
        self.reference = model_state(self.model)
        self.trained_parameters = trained_parameter_count(ModelConfig.from_settings(run))
        self.server_eval = load_server_eval(run, self.model)
        self.velocity: dict[str, np.ndarray] | None = None  # server momentum (FedAvgM)
        self.returning = 0  # on a resume: how many sites trained the last recorded round
        self.introduced: set[int] = set()  # nodes asked for their names

    def execute(self) -> str:
        """Run the remaining rounds; returns the final phase ("completed" or "stopped")."""
        try:
            return self._rounds()
        finally:
            self.results.close()

    def _rounds(self) -> str:
        state, first = self._starting_point()
        nodes = self._wait_for_sites(first, rejoin=True)
        rounds_done = first - 1
        for round_number in range(first, self.run.rounds + 1):
            nodes = self._available_nodes()
            if len(nodes) < self.run.min_sites:
                # A round with fewer sites than min_sites would be paid for and discarded.
                log.warning("round %d: %d sites connected, fewer than the minimum of %d; waiting for sites "
                            "before asking any to train", round_number, len(nodes), self.run.min_sites)
                nodes = self._wait_for_sites(round_number, rejoin=False)
            self._learn_names(nodes)  # once per site and registration: not part of the round
            started = time.monotonic()
            chosen = self._sample(nodes, round_number)
            self._status("training", round_number, connected=len(nodes), asked=len(chosen))
            if self.run.secure_aggregation:
                outcome, combined = self._secure_round(round_number, chosen, state)
            else:
                outcome = self._plain_round(round_number, chosen, state)
                combined = self._aggregate(round_number, state, outcome) \
                    if len(outcome.updates) >= self.run.min_sites else None
            self._record_validation(round_number - 1, outcome.site_metrics)
            aggregated = combined is not None
            if aggregated:
                state, self.velocity = server_step(state, combined, self.velocity, self.run.server_learning_rate,
                                                   self.run.server_momentum)
            else:
                log.warning("round %d: %d valid updates, fewer than the minimum of %d sites; "
                            "the global model is kept unchanged", round_number, len(outcome.trained),
                            self.run.min_sites)
            self.run_dir.save_checkpoint(round_number, state, self.velocity)
            rounds_done = round_number
            self._record_round(round_number, outcome, aggregated, state, time.monotonic() - started)
            if not outcome.trained and outcome.budget_exhausted and not outcome.failed and not outcome.missing:
                log.warning("every site that answered has exhausted its privacy budget; stopping")
                self._finish(state, rounds_done)
                self._status("stopped", round_number, reason="every site's privacy budget is exhausted")
                return "stopped"
        self._final_validation(state, rounds_done)
        self._finish(state, rounds_done)
        self._status("completed", rounds_done)
        return "completed"

    # -- rounds ------------------------------------------------------------------------

    def _starting_point(self) -> tuple[dict[str, np.ndarray], int]:
        if self.run.start_round == 1 and self.run.initial_model:
            state, self.initial_model = load_initial_model(self.run)
            log.info("starting from the initial model %s", self.initial_model["source"])
            return state, 1
        if self.run.start_round == 1:
            return self.reference, 1
        checkpoint = self.run_dir.last_checkpoint()
        if checkpoint is None or checkpoint[0] != self.run.start_round - 1:
            found = "none" if checkpoint is None else f"round {checkpoint[0]}"
            raise RuntimeError(f"cannot resume at round {self.run.start_round}: it needs the checkpoint of "
                               f"round {self.run.start_round - 1} in {self.run_dir.path}, found {found}")
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
            log.warning("no server velocity saved with the checkpoint of round %d; server momentum restarts "
                        "from zero", checkpoint[0])
        for record in self.run_dir.metrics():
            for name, site in record.get("sites", {}).items():
                self._remember_site(name, site)
            if record.get("event") == "round":
                self.returning = len(record.get("trained", []))
        for record in self.run_dir.received():
            self.names[int(record["node_id"])] = str(record["site"])
        return checkpoint[1], self.run.start_round

    def _wait_for_sites(self, round_number: int, rejoin: bool) -> list[int]:
        """Wait for ``min_sites`` sites before ``round_number``. With ``rejoin`` (a run's
        start): a resumed run's SuperLink starts afresh and the sites register again one by
        one, so the sites of the last recorded round get up to ``REJOIN_GRACE`` seconds to
        come back before it starts with fewer."""
        started = time.monotonic()
        deadline = started + self.run.site_wait_timeout
        while True:
            nodes = self._available_nodes()
            self._status("waiting", round_number, connected=len(nodes))
            rejoining = rejoin and time.monotonic() < started + REJOIN_GRACE
            if len(nodes) >= max(self.run.min_sites, self.returning if rejoining else 0):
                log.info("%d sites connected (minimum %d)", len(nodes), self.run.min_sites)
                return nodes
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(nodes)} of the minimum {self.run.min_sites} sites connected "
                                   f"within {self.run.site_wait_timeout:.0f} s")
            time.sleep(0.5)

    def _learn_names(self, nodes: list[int]) -> None:
        """Ask sites not heard from yet for their names (a query message, answered with the
        name only), so that a site which drops out before its first reply is still named.
        Node ids change when a site registers again, e.g. with a restarted coordinator."""
        unknown = [node for node in nodes if node not in self.names and node not in self.introduced]
        if not unknown:
            return
        self.introduced.update(unknown)
        messages = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in unknown]
        replies, _, _ = self._exchange(messages, timeout=INTRODUCTION_TIMEOUT)
        for node, reply in replies.items():
            if not reply.has_error() and protocol.SITE in reply.content:
                self._site_name(node, reply.content[protocol.SITE].get("name", ""))

    def _available_nodes(self) -> list[int]:
        return sorted(self.grid.get_node_ids())

    def _sample(self, nodes: list[int], round_number: int) -> list[int]:
        count = max(self.run.min_sites, math.ceil(self.run.fraction_train * len(nodes)))
        if count >= len(nodes):
            return list(nodes)
        rng = np.random.default_rng([self.run.seed, round_number])
        return sorted(int(n) for n in rng.choice(nodes, size=count, replace=False))

    def _message(self, kind: str, node: int, state: dict[str, np.ndarray], round_number: int) -> Message:
        content = RecordDict({
            protocol.ARRAYS: vector_to_record(pack(state)),
            protocol.CONFIG: ConfigRecord({"round": round_number}),
        })
        return Message(content, dst_node_id=node, message_type=kind, group_id=str(round_number))

    def _exchange(self, messages: list[Message], timeout: float | None = None
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

    def _plain_round(self, round_number: int, chosen: list[int], state: dict[str, np.ndarray]) -> RoundOutcome:
        messages = [self._message(MessageType.TRAIN, node, state, round_number) for node in chosen]
        replies, missing, arrivals = self._exchange(messages)
        outcome = self._collect(round_number, replies, missing)
        outcome.reply_seconds = {self._name(node): t for node, t in arrivals.items()}
        return outcome

    def _secure_round(self, round_number: int, chosen: list[int], state: dict[str, np.ndarray]
                      ) -> tuple[RoundOutcome, dict[str, np.ndarray] | None]:
        """A round under secure aggregation (``fedmed.flower.secagg``): the coordinator
        learns the sum of the sites' bounded, weighted moves and of their weight shares,
        and moves the model by their ratio, itself bounded. None: the round changes nothing."""
        secure = SecureSum(round_number, chosen)
        outcome = RoundOutcome()
        try:
            stage_timeout = min(self.run.round_timeout, SECURE_STAGE_TIMEOUT)
            secure.take_keys(self._exchange(secure.keys_messages(), stage_timeout)[0])
            secure.take_shares(self._exchange(secure.shares_messages(), stage_timeout)[0])
            replies, missing, arrivals = self._exchange(secure.train_messages(
                lambda node: self._message(MessageType.TRAIN, node, state, round_number)))
            outcome = self._collect(round_number, replies, missing)
            outcome.reply_seconds = {self._name(node): t for node, t in arrivals.items()}
            secure.take_masked(outcome.masked)
            total, count = secure.unmask(self._exchange(secure.unmask_messages(), stage_timeout)[0])
        except SecureRoundFailed as error:
            outcome.secure = {"threshold": secure.threshold, "failed": str(error)}
            log.warning("round %d: secure aggregation failed: %s", round_number, error)
            return outcome, None
        outcome.secure = {"threshold": secure.threshold, "summed": count,
                          "dropped": [self._name(n) for n in secure.dropped]}
        share = float(total[-1])
        outcome.examples = share * weight_cap(self.run)
        if not 0 < share <= count + 1e-6:
            outcome.secure["failed"] = (f"the {count} sites' weight shares sum to {share:.6g}, outside 0..{count}: "
                                        "a site broke the protocol")
            return outcome, None
        if count < self.run.min_sites:
            return outcome, None  # recorded as too few valid updates, as without secure aggregation
        move = total[:-1] / share
        reports = [m for m in outcome.site_metrics.values() if m.get("status") == RoundStatus.TRAINED]
        outcome.norm_bound = round_norm_bound(self.run, round_number, reports, self.trained_parameters,
                                              state_norm(state))
        norm = scale_to_bound(move, outcome.norm_bound)
        if norm is not None:
            outcome.clipped["aggregate"] = (f"summed move's norm {norm:.4g} above the bound "
                                            f"{outcome.norm_bound:.4g}: scaled down to it")
        return outcome, apply_move(state, move)

    def _collect(self, round_number: int, replies: dict[int, Message], missing: list[int]) -> RoundOutcome:
        outcome = RoundOutcome(missing=[self._name(n) for n in missing])
        for node, reply in replies.items():
            if reply.has_error():
                outcome.failed[self._name(node)] = str(reply.error.reason)[:300]
                continue
            problems, name, metrics, state = self._read_reply(node, reply)
            self._audit(round_number, node, name, reply)
            if problems:
                outcome.rejected[name] = "; ".join(problems)
                log.warning("round %d: update of %s dropped: %s", round_number, name, outcome.rejected[name])
                continue
            outcome.site_metrics[name] = metrics
            if metrics.get("status") == RoundStatus.BUDGET_EXHAUSTED:
                outcome.budget_exhausted.append(name)
            elif self.run.secure_aggregation:
                outcome.masked[node] = state[secagg.MASKED]
                outcome.trained.append(name)
            else:
                outcome.updates.append(SiteUpdate(name, int(metrics["examples"]), state))
                outcome.trained.append(name)
                outcome.examples += int(metrics["examples"])
        for name, reason in outcome.failed.items():
            log.warning("round %d: site %s failed: %s", round_number, name, reason)
        if outcome.missing:
            log.warning("round %d: no reply within %.0f s from %s", round_number, self.run.round_timeout,
                        ", ".join(outcome.missing))
        return outcome

    def _read_reply(self, node: int, reply: Message) -> tuple[list[str], str, dict, dict]:
        """Check a site's reply against the protocol; returns problems, name, scalars, arrays."""
        content = reply.content
        problems = []
        expected = {protocol.METRICS, protocol.SITE}
        expected |= {secagg.MASKED, secagg.RECORD} if self.run.secure_aggregation else {protocol.ARRAYS}
        extra = sorted(set(content.keys()) - expected)
        if extra:
            problems.append(f"unexpected records: {', '.join(extra)}")
        site = dict(content.get(protocol.SITE, {}))
        name = self._site_name(node, site.get("name"))
        if set(site) - protocol.REPLY_TEXT or any(len(str(v)) > protocol.MAX_TEXT for v in site.values()):
            problems.append("site record has fields or text beyond the protocol")
        metrics = dict(content.get(protocol.METRICS, {}))
        unknown = sorted(set(metrics) - protocol.REPLY_METRICS)
        if unknown:
            problems.append(f"metrics outside the whitelist: {', '.join(unknown)}")
        problems += self._check_values(metrics)
        status = metrics.get("status")
        state: dict = {}
        if status == RoundStatus.TRAINED and self.run.secure_aggregation:
            problems += self._check_masked(content, metrics)
            if not problems:
                state = {secagg.MASKED: content[secagg.MASKED][secagg.MASKED].numpy()}
        elif status == RoundStatus.TRAINED:
            if protocol.ARRAYS not in content:
                problems.append("a trained reply without model arrays")
            else:
                try:
                    size = sum(a.size for a in self.reference.values())  # checked before deserialising
                    state = unpack(record_to_vector(content[protocol.ARRAYS], size), self.reference)
                except Exception as error:  # any undecodable or misshapen array
                    problems.append(f"model arrays cannot be used: {error}")
                else:
                    problems += validate_update(state, metrics.get("examples", math.nan), self.reference)
        elif status == RoundStatus.BUDGET_EXHAUSTED:
            if protocol.ARRAYS in content or secagg.MASKED in content:
                problems.append("a budget-exhausted reply must not carry arrays")
        else:
            problems.append(f"unknown status {status!r}")
        return problems, name, metrics, state

    def _check_masked(self, content: RecordDict, metrics: dict) -> list[str]:
        """A masked update is one uint64 vector: the model's size plus the weight share."""
        size = sum(a.size for a in self.reference.values()) + 1
        if "examples" in metrics:
            return ["a secure-aggregation reply must not send its record count in clear"]
        record = content.get(secagg.MASKED)
        if record is None or list(record.keys()) != [secagg.MASKED]:
            return ["a trained secure-aggregation reply without its masked vector"]
        try:
            check_declared(record[secagg.MASKED], size, np.uint64)  # before deserialising
        except ValueError as error:
            return [f"the masked vector cannot be used: {error}"]
        vector = record[secagg.MASKED].numpy()
        if vector.dtype != np.uint64 or vector.shape != (size,):
            return [f"the masked vector is {vector.dtype}{list(vector.shape)}, expected uint64[{size}]"]
        return []

    def _check_values(self, metrics: dict) -> list[str]:
        """Single numbers, except the validation counts: a list of the run's length."""
        problems = []
        counts = metrics.get(protocol.VALIDATION_COUNTS)
        expected = counts_length(len(self.run.class_names))
        if counts is not None and (not isinstance(counts, list) or len(counts) != expected
                                   or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in counts)):
            problems.append(f"validation counts must be {expected} finite numbers")
        noise = metrics.get(protocol.VALIDATION_NOISE)
        if noise is not None and not (isinstance(noise, (int, float)) and 0 <= noise <= MAX_VALIDATION_NOISE):
            problems.append(f"the validation noise must be a number in [0, {MAX_VALIDATION_NOISE:g}]")
        if any(not isinstance(v, (int, float)) for k, v in metrics.items() if k != protocol.VALIDATION_COUNTS):
            problems.append("metrics must be single numbers")
        return problems

    def _audit(self, round_number: int, node: int, name: str, reply: Message) -> None:
        """Record what this reply carried, so anyone can check what left each site."""
        content = reply.content
        arrays = {k: [list(a.shape), str(a.dtype)] for record in (protocol.ARRAYS, secagg.MASKED)
                  if record in content for k, a in content[record].items()}
        self.run_dir.append_received({
            "round": round_number, "site": name, "node_id": node,
            "records": sorted(content.keys()), "arrays": arrays,
            "metrics": dict(content.get(protocol.METRICS, {})),
            "text": dict(content.get(protocol.SITE, {})),
            "key_bound": node in self.bound,
        })

    def _site_name(self, node: int, claimed: object) -> str:
        """The name a reply is recorded under: with site keys, the name the node's key was
        registered under, whatever the reply claims (a site cannot answer as another);
        otherwise the name the site gives."""
        claimed = str(claimed or "")[:100]
        name = self.bound.get(node) or claimed or self._name(node)
        if node in self.bound and claimed and claimed != name and self.names.get(node) != name:
            log.warning("node %d, registered with the key of %s, answers as %r; its replies are recorded as %s",
                        node, name, claimed, name)
        self.names[node] = name
        return name

    def _name(self, node: int) -> str:
        return self.bound.get(node) or self.names.get(node, f"node-{node}")

    def _aggregate(self, round_number: int, state: dict[str, np.ndarray], outcome: RoundOutcome
                   ) -> dict[str, np.ndarray]:
        """The sites' combined model (``fedmed.coordinator.aggregation``); what was bounded goes into ``outcome``."""
        reports = [outcome.site_metrics[u.site] for u in outcome.updates]
        combined, bounded = aggregate_round(self.run, round_number, state, outcome.updates, reports,
                                            self.trained_parameters)
        outcome.norm_bound, outcome.clipped = bounded.norm_bound, bounded.clipped
        for name, reason in bounded.clipped.items():
            log.warning("round %d: update of %s bounded: %s", round_number, name, reason)
        return combined

    # -- records -----------------------------------------------------------------------

    def _record_round(self, round_number: int, outcome: RoundOutcome, aggregated: bool,
                      state: dict[str, np.ndarray], seconds: float) -> None:
        for name, metrics in outcome.site_metrics.items():
            self._remember_site(name, metrics)
        trained = outcome.trained
        examples = outcome.examples
        losses = [(outcome.site_metrics[u.site].get("loss", math.nan), u.examples) for u in outcome.updates]
        record = {
            "event": "round", "round": round_number, "rounds": self.run.rounds,
            "seconds": seconds, "aggregated": aggregated, "min_sites": self.run.min_sites,
            "trained": trained, "budget_exhausted": outcome.budget_exhausted,
            "rejected": outcome.rejected, "clipped": outcome.clipped,
            "norm_bound": outcome.norm_bound if math.isfinite(outcome.norm_bound) else None,
            "aggregation": self.run.aggregation, "secure_aggregation": outcome.secure,
            "failed": outcome.failed, "missing": outcome.missing,
            "examples": examples, "train_loss": _weighted(losses),
            "slowest_site_train_seconds": max(
                (m.get("seconds-train", 0.0) for m in outcome.site_metrics.values()), default=0.0),
            "sites": {name: _site_fields(m) for name, m in outcome.site_metrics.items()},
            "reply_seconds": outcome.reply_seconds,
        }
        if self.server_eval is not None and self.run.evaluates(round_number):
            record["server_validation"] = self.last_held_out = self._evaluate_on_server(state)
        if not aggregated:
            record["note"] = (f"only {len(trained)} valid updates, below the minimum of {self.run.min_sites} "
                              "sites: global model unchanged this round")
        self.run_dir.append_metrics(record)
        self.results.record(record)
        log.info("round %d/%d: %d trained, %d budget exhausted, %d rejected, %d failed, %d missing (%.1f s)",
                 round_number, self.run.rounds, len(trained), len(outcome.budget_exhausted),
                 len(outcome.rejected), len(outcome.failed), len(outcome.missing), seconds)

    def _record_validation(self, model_round: int, site_metrics: dict[str, dict]) -> None:
        """Each site's validation of the global model after ``model_round`` (0: the initial
        one): scores from its noisy counts, or the exact scores a site released. The sites'
        combined scores come from their summed counts when all sent counts. Scores from
        noisy counts get standard errors ("errors": the noise each site stated, summed in
        variance for the combined counts)."""
        classes = len(self.run.class_names)
        counts = {name: np.asarray(m[protocol.VALIDATION_COUNTS], dtype=np.float64)
                  for name, m in site_metrics.items() if protocol.VALIDATION_COUNTS in m}
        noise = {name: float(site_metrics[name].get(protocol.VALIDATION_NOISE, math.nan)) for name in counts}
        scores = {name: scores_from_counts(c, classes) for name, c in counts.items()}
        errors = {name: _errors(c, noise[name], classes) for name, c in counts.items()}
        scores |= {name: {k: v for k, v in m.items() if k.startswith("val-")} for name, m in site_metrics.items()
                   if name not in counts}
        # a site that sent counts is kept whatever its noisy total (it may be below zero)
        sites = {name: s for name, s in scores.items() if name in counts or s.get("val-examples", 0) > 0}
        if not sites:
            return
        if counts and len(counts) == len(sites):
            summed = sum(counts.values())  # independent noise: the variances add
            weighted = scores_from_counts(summed, classes)
            weighted_errors = _errors(summed, math.sqrt(sum(n * n for n in noise.values())), classes)
        else:
            weighted_errors = {}
            weighted = {key: _weighted([(s.get(key, math.nan), s["val-examples"]) for s in sites.values()])
                        for key in protocol.VALIDATION_METRICS[1:]}
            weighted["val-examples"] = sum(s["val-examples"] for s in sites.values())
        record = {"event": "validation", "round": model_round, "sites": sites, "weighted": weighted,
                  "errors": {"sites": errors, "weighted": weighted_errors}}
        self.run_dir.append_metrics(record)
        self.results.record(record)
        self.last_validation = weighted | weighted_errors

    def _final_validation(self, state: dict[str, np.ndarray], rounds_done: int) -> None:
        nodes = self._available_nodes()
        self._status("evaluating", rounds_done, connected=len(nodes))
        replies, _, _ = self._exchange([self._message(MessageType.EVALUATE, n, state, rounds_done) for n in nodes])
        metrics = {}
        for node, reply in replies.items():
            if reply.has_error():
                continue
            problems, name, values = self._read_evaluation(node, reply, rounds_done)
            if not problems:
                metrics[name] = values
        self._record_validation(rounds_done, metrics)

    def _read_evaluation(self, node: int, reply: Message, round_number: int) -> tuple[list[str], str, dict]:
        content = reply.content
        name = self._site_name(node, dict(content.get(protocol.SITE, {})).get("name"))
        metrics = dict(content.get(protocol.METRICS, {}))
        problems = self._check_values(metrics)
        if set(content.keys()) - {protocol.METRICS, protocol.SITE}:
            problems.append("an evaluation reply must carry metrics only")
        if set(metrics) - {*protocol.VALIDATION_METRICS, protocol.VALIDATION_COUNTS, protocol.VALIDATION_NOISE}:
            problems.append("metrics outside the whitelist")
        self._audit(round_number, node, name, reply)
        return problems, name, metrics

    def _remember_site(self, name: str, metrics: dict) -> None:
        site = self.sites.setdefault(name, {"rounds_trained": 0})
        if metrics.get("status") == RoundStatus.TRAINED:
            site["rounds_trained"] += 1
        for key in ("examples", "epsilon", "delta", "dp"):
            if key in metrics:
                site[key] = metrics[key]
        if metrics.get("privacy-unit") in range(len(PRIVACY_UNITS)):
            site["privacy_unit"] = PRIVACY_UNITS[int(metrics["privacy-unit"])]
        if "dp" in site:
            site["dp"] = bool(site["dp"])
        if "status" in metrics:
            site["status"] = RoundStatus.label_of(metrics["status"])

    def _evaluate_on_server(self, state: dict[str, np.ndarray]) -> dict:
        from fedmed.train import evaluate

        load_state(self.model, state)
        images, labels = self.server_eval
        scores = evaluate(self.model, images, labels)
        return {k: v for k, v in scores.items() if isinstance(v, float)} | {"examples": int(len(labels))}

    def _finish(self, state: dict[str, np.ndarray], rounds_done: int) -> None:
        card = model_card(self.run, self.sites, rounds_done, self.last_validation, weights=state,
                          held_out=self.last_held_out, initial_model=self.initial_model)
        self.run_dir.write_final_model(state, card, model_card_markdown(card))

    def _status(self, phase: str, round_number: int, **extra) -> None:
        self.run_dir.write_status(phase=phase, round=round_number, rounds=self.run.rounds,
                                  validation=self.last_validation, **extra)


def _site_fields(metrics: dict) -> dict:
    fields = {k: v for k, v in metrics.items() if not k.startswith("val-")}
    fields["status_name"] = RoundStatus.label_of(fields.get("status"))
    return fields


def _errors(counts: np.ndarray, noise_std: float, classes: int) -> dict[str, float]:
    """Standard errors of the scores from noisy counts (``score_errors``); none when the
    site did not say its noise (an older fedmed)."""
    return score_errors(counts, noise_std, classes) if math.isfinite(noise_std) else {}


def _weighted(pairs: list[tuple[float, float]]) -> float:
    pairs = [(v, w) for v, w in pairs if v is not None and math.isfinite(v) and w > 0]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else math.nan


def load_server_eval(run: RunSettings, model: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """The coordinator's own held-out set, if it has one, as ``model`` is fed it
    (``fedmed.model.fixed_inputs``), with its labels."""
    if not run.server_eval_data:
        return None
    from fedmed.data.cache import default_cache_dir
    from fedmed.data.dicom import ReadOptions
    from fedmed.data.site import SiteSource, load_site

    data = load_site(SiteSource.from_path(run.server_eval_data, run.class_names),
                     ReadOptions(image_size=run.image_size), default_cache_dir())
    if len(data) == 0:
        raise ValueError(f"server evaluation data {run.server_eval_data} has no usable images")
    return fixed_inputs(model, np.asarray(data.images)), data.labels
