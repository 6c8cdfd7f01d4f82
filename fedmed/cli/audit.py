"""``fedmed audit SCENARIO --out DIR``: an empirical privacy audit of a scenario's federated
run (the work itself: ``fedmed.audit.run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedmed.config.command_line import add_scenario_overrides

CRITICAL_EXIT = 3  # the exit code when the audit's lower bound is above the ledger's epsilon


def register(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "audit",
        help="audit a simulated federation: canaries and membership attacks against the ledgers' epsilon",
        description="Run a fedmed-simulate scenario's federated rounds in one process, with canaries (noise images "
        "with random classes, each trained on with probability 1/2) at one site, then attack the final model. "
        "Prints the one-run canary audit's lower bound on that site's epsilon (95%% confidence; Steinke, Nasr & "
        "Jagielski 2023) beside the epsilon its ledger recorded, and every site's membership-inference AUC. "
        f"A lower bound above the ledger's epsilon is a critical finding (exit code {CRITICAL_EXIT}). "
        "Writes DIR/audit.json; fedmed-report shows each site's membership attacks with its ledger.",
    )
    p.add_argument("scenario", type=Path, metavar="SCENARIO", help="a fedmed-simulate scenario file")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="where the audit's run and report go")
    add_scenario_overrides(p)
    p.add_argument("--site", default="", help="the site given the canaries (default: the first)")
    p.add_argument("--canaries", type=int, default=200, help="how many canaries (default 200)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="fix the canaries and which are included (default: secret, as an auditor's should be)",
    )
    p.set_defaults(handler=_audit)


def _audit(args: argparse.Namespace) -> int:
    from fedmed.audit.run import audit_scenario  # torch: only when auditing
    from fedmed.simulate.scenario import load_scenario

    scenario = load_scenario(args.scenario, args.overrides)
    if (args.out / "audit.json").exists():
        raise FileExistsError(f"{args.out} already holds an audit; choose another --out")

    def show(view) -> None:
        spent = max(r.metrics.get("epsilon", 0.0) for r in view.replies)
        print(f"round {view.number}/{scenario.run.rounds}: largest epsilon spent {spent:.3f}", flush=True)

    result = audit_scenario(scenario, args.out, site=args.site, canaries=args.canaries, seed=args.seed, on_round=show)
    canary = result["canary_audit"]
    print(
        f"site {result['site']}: ledger epsilon {result['ledger_epsilon']:.3f} (delta {canary['delta']:g}); "
        f"canary audit lower bound {canary['epsilon_lower_bound']:.3f} at {canary['confidence']:.0%} confidence "
        f"({canary['correct']} of {canary['guesses']} guesses right, {canary['canaries']} canaries)"
    )
    for site, attacks in result["membership"].items():
        shown = ", ".join(
            f"{a['attack']} AUC {a['auc']:.3f} [{a['interval'][0]:.3f}, {a['interval'][1]:.3f}]" for a in attacks
        )
        print(f"site {site}: membership inference {shown}")
    print(f"audit: {args.out / 'audit.json'}")
    if result["critical"]:
        print(
            f"CRITICAL: the audit's lower bound is above the epsilon site {result['site']}'s ledger recorded: the "
            "model reveals more about its records than the ledger allows (missing or too little noise?)"
        )
        return CRITICAL_EXIT
    return 0
