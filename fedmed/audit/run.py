"""``fedmed audit``: a scenario's federated run with canaries at one site, in one process,
and what an attacker learns from its final model, beside what the ledgers claim.

The rounds are fedmed's own (``fedmed.simulate.in_process``): every site trains with DP-SGD
at its own budget and records its spending in its own ledger, exactly as in
``fedmed-simulate``. One site (``site``) also draws the included canaries in its DP-SGD
steps (``fedmed.audit.canaries``). Afterwards:

- the canary audit's lower bound on that site's epsilon (``fedmed.audit.bounds``), at the
  delta its ledger used, beside the epsilon its ledger recorded: a bound above the ledger's
  epsilon is a critical finding (the noise the ledger paid for is not in the model);
- each site's membership-inference attacks on the final model (``fedmed.audit.membership``),
  written beside its ledger (``privacy-audit.json``, with the canary audit for the site that
  held them), where its privacy report finds them.

Everything is written to ``out/audit.json``.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from fedmed.audit import SITE_AUDIT_FILE
from fedmed.audit.bounds import audit_bound
from fedmed.audit.canaries import Canaries, CanarySite
from fedmed.audit.membership import membership_attacks
from fedmed.config import RunSettings
from fedmed.model import ModelConfig, build_model
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.simulate.baselines import starting_state
from fedmed.simulate.in_process import RoundView, run_rounds
from fedmed.simulate.pretrained import pretrained_model
from fedmed.simulate.scenario import Scenario
from fedmed.simulate.sites import prepare_sites
from fedmed.site.work import SiteWork
from fedmed.weights import load_state

AUDIT_FILE = "audit.json"
CONFIDENCE = 0.95


def audit_scenario(
    scenario: Scenario,
    out: Path,
    *,
    site: str = "",
    canaries: int = 200,
    seed: int | None = None,
    on_round: Callable[[RoundView], None] | None = None,
) -> dict:
    """Run ``scenario``'s federation with ``canaries`` canaries at ``site`` (default: the
    first site) and audit it; returns what ``out/audit.json`` holds. ``seed`` fixes the
    canaries and their inclusion (default: secret)."""
    out = out.resolve()
    data = prepare_sites(scenario, out / "data")
    if scenario.pretrain.data and not scenario.run.initial_model:  # as fedmed-simulate: from the public model
        public = pretrained_model(scenario, out / "public")
        scenario = dataclasses.replace(scenario, run=dataclasses.replace(scenario.run, initial_model=str(public)))
    run = dataclasses.replace(
        scenario.run, run_dir=str(out / "run"), run_id=f"audit-{uuid.uuid4().hex[:12]}", server_eval_data=""
    )
    names = list(data.names)
    audited = site or names[0]
    if audited not in names:
        raise ValueError(f"no site {audited!r} in this scenario; its sites are {', '.join(names)}")
    ledgers = {name: out / "sites" / name / "ledger.jsonl" for name in names}
    start = starting_state(run)
    start_model = _model(run, start)
    drawn = Canaries.draw(canaries, start_model, secrets.randbits(63) if seed is None else seed)
    sites: list[SiteWork] = []
    for name, folder, settings in zip(names, data.site_dirs, scenario.site_settings):
        own = dataclasses.replace(settings, name=name, data=str(folder), ledger=str(ledgers[name]))
        if name == audited and not own.dp:
            raise ValueError(f"site {audited} trains without DP: there is no epsilon to audit")
        sites.append(CanarySite(own, drawn) if name == audited else SiteWork(own))
    final = run_rounds(run, sites, start, on_round)
    final_model = _model(run, final)

    ledger = PrivacyLedger(ledgers[audited])
    if not ledger.entries:
        raise ValueError(f"site {audited} trained no round, so there is nothing to audit (see its ledger)")
    delta = ledger.entries[-1].delta
    claimed = ledger.epsilon(delta)
    bound = audit_bound(drawn.scores(start_model, start, final), drawn.included, delta, CONFIDENCE)
    membership = {}
    for work in sites:
        name = work.site.name
        membership[name] = site_membership(work, run, start_model, final_model)
        found: dict[str, object] = {"run_id": run.run_id, "membership": membership[name]}
        if name == audited:
            found |= {"canary_audit": bound.to_json(), "ledger_epsilon": claimed}
        (ledgers[name].parent / SITE_AUDIT_FILE).write_text(json.dumps(found, indent=2) + "\n")
    result = {
        "run_id": run.run_id,
        "scenario": scenario.name,
        "site": audited,
        "dp": bool(next(s for s in sites if s.site.name == audited).site.dp),
        "ledger_epsilon": claimed,
        "canary_audit": bound.to_json(),
        "critical": bound.epsilon > claimed,
        "membership": membership,
        "ledgers": {name: str(path) for name, path in ledgers.items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / AUDIT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def site_membership(work: SiteWork, run: RunSettings, start: nn.Module, final: nn.Module) -> list[dict]:
    """The membership attacks on ``final`` at one site: its training patients against its
    validation patients."""
    split = work.split(run)
    inputs = work.inputs(run, final)
    train = (inputs.train, inputs.train_labels, split.train_patients)
    validation = (inputs.val, inputs.val_labels, inputs.val_patients)
    return [a.to_json() for a in membership_attacks(final, start, train, validation)]


def _model(run: RunSettings, state: dict[str, np.ndarray]) -> nn.Module:
    model = build_model(ModelConfig.from_settings(run))
    load_state(model, state)
    return model
