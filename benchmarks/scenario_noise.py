"""The noise multiplier each site of a scenario calibrates at its first round, by the
ledger's accountant before issue 27 (RDP) and now (PLD), at several budgets.

Usage: python benchmarks/scenario_noise.py simulations/pneumonia-5-sites.toml \\
           --set data.path=../shared/data/pneumoniamnist.npz [--set ...]

Each site is the scenario's own (its partition and validation split, as fedmed-simulate
makes them; every PneumoniaMNIST image is its own patient). "After" is fedmed's code itself:
an empty ledger, the run's planned releases reserved (``SiteReleases.reserved``) and the
round planned (``plan_round_privacy``), as a site does at its first round. "Before" repeats
that arithmetic with RDP: the releases' noise, then DP-SGD's around them. Budgets set
``privacy.max_epsilon``, ``target_epsilon`` and ``max_epsilon_per_run`` alike (BENCHMARKS.md's
``BUDGET e``); epsilon 1 also with the shipped eps-1 recipe (10 rounds, batch 128).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from accountants import rdp_calibrated  # benchmarks/accountants.py, beside this script

from fedmed.config import RunSettings, SiteSettings
from fedmed.data.split import split_by_patient
from fedmed.privacy.accounting import default_delta, round_plan
from fedmed.privacy.budget import PrivacyConfig, plan_round_privacy
from fedmed.privacy.ledger import PrivacyLedger
from fedmed.privacy.release import SiteReleases
from fedmed.simulate.scenario import load_scenario
from fedmed.simulate.sites import _partition

BUDGETS = [(8.0, {}), (3.0, {}), (1.0, {}), (1.0, {"rounds": 10, "batch_size": 128})]


def site_records(scenario) -> list[int]:
    """Each site's training records: its images less its validation patients."""
    pool, parts, _ = _partition(scenario)
    run = scenario.run
    return [
        len(split_by_patient(pool.labels[part], [pool.patient_ids[i] for i in part], run.val_fraction, run.seed)[0])
        for part in parts
    ]


def after(run: RunSettings, site: SiteSettings, records: int, folder: Path) -> float:
    """The noise multiplier fedmed's own code plans for a site's first round."""
    privacy = PrivacyConfig.from_settings(site, run)
    ledger = PrivacyLedger(folder / f"{site.name}-{run.rounds}-{run.batch_size}-{privacy.target_epsilon}.jsonl")
    evaluations = sum(run.evaluates(r) for r in range(run.rounds + 1))
    releases = SiteReleases(ledger, privacy, site.name, "bench", unit="patient", records=records,
                            evaluations=evaluations)
    plan = plan_round_privacy(privacy, ledger, "bench", examples=records, batch_size=run.batch_size,
                              epochs=run.local_epochs, local_steps=run.local_steps, reserved=releases.reserved())
    assert plan.allowed, plan.reason
    return plan.noise_multiplier


def before(run: RunSettings, site: SiteSettings, records: int) -> float:
    """The same plan by RDP, as fedmed calibrated before issue 27 (empty ledger: the target
    and the per-run ceiling, equal here, give the same noise)."""
    privacy = PrivacyConfig.from_settings(site, run)
    delta = privacy.delta if privacy.delta is not None else default_delta(records)
    planned = 1 + sum(run.evaluates(r) for r in range(run.rounds + 1))  # the count, each evaluated model
    z = rdp_calibrated(privacy.release_share * privacy.target_epsilon, delta, 1.0, planned, [])
    rate, steps = round_plan(records, run.batch_size, run.local_epochs, run.local_steps)
    return rdp_calibrated(privacy.target_epsilon, delta, rate, steps * run.rounds, [(z, 1.0, planned)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    scenario = load_scenario(args.scenario, args.overrides)
    records = site_records(scenario)
    print(f"sites' training records: {records}")
    print("| epsilon | recipe | " + " | ".join(f"site {i + 1} ({n})" for i, n in enumerate(records)) + " |")
    print("|---|---|" + "---|" * len(records))
    with tempfile.TemporaryDirectory() as folder:
        for budget, change in BUDGETS:
            run = dataclasses.replace(scenario.run, **change)
            cells = []
            for number, (settings, n) in enumerate(zip(scenario.site_settings, records), start=1):
                site = dataclasses.replace(settings, name=f"site-{number}", max_epsilon=budget,
                                           target_epsilon=budget, max_epsilon_per_run=budget)
                old, new = before(run, site, n), after(run, site, n, Path(folder))
                cells.append(f"{old:.3f} -> {new:.3f} ({new / old - 1:+.1%})")
            recipe = f"{run.rounds} x {run.local_steps} steps, batch {run.batch_size}"
            print(f"| {budget:g} | {recipe} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
