"""Which accountant should the ledger use (issue 27)? Tightness, speed and numerical
behaviour of RDP (Opacus's analysis, the ledger's before), PLD (dp-accounting, pessimistic,
add-or-remove neighbours: the ledger's now) and PRV (Opacus's PRVAccountant).

Usage: python benchmarks/accountants.py [--skip-stability]

Prints three Markdown tables (BENCHMARKS.md, "Accountant (issue 27)"):

* tightness: epsilon of realistic site histories by each accountant (the shipped scenario's
  mid-sized site, 30 rounds x 5 steps at 64/900 with its count and 7 validation releases,
  noise calibrated by RDP to epsilon 8, 3 and 1; a demo-like site, 30 rounds x 2 steps);
* speed: a 300-entry history (24 runs of the shipped recipe, each with its own noise):
  epsilon cold (empty caches, as in a site's fresh process), after one more round (warm), and
  a whole ``calibrate_noise`` on top of it;
* stability: small sample rates (1e-3, 1e-4) with small and large noise.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Callable

from opacus.accountants import PRVAccountant

from fedmed.privacy import pld
from fedmed.privacy.accounting import calibrate_noise
from fedmed.privacy.history import History, extend
from fedmed.privacy.rdp import rdp_epsilon

SITE_IMAGES, BATCH, ROUNDS, STEPS, EVERY = 900, 64, 30, 5, 5  # a mid-sized site of pneumonia-5-sites
RELEASE_NOISE = {8.0: 4.27, 3.0: 10.9, 1.0: 31.5}  # its releases' noise at release_share 0.25 (about)


def pld_epsilon_cold(history: History, delta: float) -> float:
    """fedmed's PLD epsilon with every cache emptied first: what a site's fresh process pays."""
    pld._PREFIXES.clear()
    pld._epsilon.cache_clear()
    pld._step_pld.cache_clear()
    return pld.pld_epsilon(history, delta)


def prv_epsilon(history: History, delta: float) -> float:
    """Opacus's PRV upper bound at its default epsilon error (0.01)."""
    accountant = PRVAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def rdp_calibrated(target: float, delta: float, rate: float, steps: int, spent: History) -> float:
    """The noise the ledger calibrated before issue 27 (RDP, bisection to 0.5 %)."""
    low, high = 0.1, 1.0
    while rdp_epsilon(extend(spent, high, rate, steps), delta) > target:
        low, high = high, high * 2
    while (high - low) / high > 0.005:
        middle = (low + high) / 2
        low, high = (low, middle) if rdp_epsilon(extend(spent, middle, rate, steps), delta) <= target else (middle, high)
    return high


def run_history(sigma: float, rate: float, z: float, rounds: int = ROUNDS, steps: int = STEPS,
                every: int = EVERY, spent: History | None = None) -> History:
    """One run as a site records it: the starting model's validation and the record count
    (two releases), then rounds, a validation release after every ``every``-th round."""
    history = extend(extend(list(spent or []), z, 1.0, 1), z, 1.0, 1)
    for number in range(1, rounds + 1):
        history = extend(history, sigma, rate, steps)
        if number % every == 0 or number == rounds:
            history = extend(history, z, 1.0, 1)
    return history


def timed(function: Callable[[], float]) -> tuple[float, float]:
    started = time.perf_counter()
    value = function()
    return value, time.perf_counter() - started


def tightness() -> None:
    print("| history | RDP | PLD (ledger) | PLD / RDP | PRV | PLD, grid 1e-4 |")
    print("|---|---|---|---|---|---|")
    rate, delta = BATCH / SITE_IMAGES, 1e-5
    cases = []
    for target, z in RELEASE_NOISE.items():
        sigma = rdp_calibrated(target, delta, rate, ROUNDS * STEPS, [(z, 1.0, 8)])
        cases.append((f"shipped, mid site, RDP-calibrated to eps {target:g} (sigma {sigma:.3f}, 150 steps + 8 releases)",
                      run_history(sigma, rate, z)))
    sigma = rdp_calibrated(8.0, delta, 64 / 450, 60, [(4.0, 1.0, 5)])
    cases.append((f"demo-like site, 30 rounds x 2 steps at 64/450 + 5 releases (sigma {sigma:.3f})",
                  run_history(sigma, 64 / 450, 4.0, steps=2, every=10)))
    for name, history in cases:
        r, p = rdp_epsilon(history, delta), pld_epsilon_cold(history, delta)
        fine = _fine_pld(history, delta)
        print(f"| {name} | {r:.3f} | {p:.3f} | {p / r:.3f} | {prv_epsilon(history, delta):.3f} | {fine:.3f} |")


def _fine_pld(history: History, delta: float) -> float:
    """The same PLD on a ten times finer grid (tighter, slower): how much the grid costs."""
    coarse = pld.DISCRETISATION
    pld.DISCRETISATION = coarse / 10
    try:
        return pld_epsilon_cold(history, delta)
    finally:
        pld.DISCRETISATION = coarse
        pld_epsilon_cold([], delta)


def long_history() -> History:
    """24 runs of the shipped recipe at one site, each run's noise its own, cut at 300 entries."""
    history: History = []
    for run in range(24):
        history = run_history(6.0 + 0.1 * run, BATCH / (SITE_IMAGES + 10 * run), 30.0 + run, spent=history)
    return history[:300]


def speed() -> None:
    history, delta = long_history(), 1e-5
    rate = BATCH / SITE_IMAGES
    print(f"300-entry history: {len(history)} entries, {len({(s, q) for s, q, _ in history})} distinct mechanisms, "
          f"{sum(n for _, _, n in history)} steps")
    print("| what | RDP | PLD (ledger) | PRV |")
    print("|---|---|---|---|")
    r, rt = timed(lambda: rdp_epsilon(history, delta))
    p, pt = timed(lambda: pld_epsilon_cold(history, delta))
    v, vt = timed(lambda: prv_epsilon(history, delta))
    print(f"| epsilon of the history, cold | {r:.3f} in {rt:.3f} s | {p:.3f} in {pt:.2f} s | {v:.3f} in {vt:.2f} s |")
    last_sigma, last_rate, _ = next(entry for entry in reversed(history) if entry[1] < 1.0)
    more = extend(history, last_sigma, last_rate, STEPS)  # the next round of the site's current run
    _, rt = timed(lambda: rdp_epsilon(more, delta))
    _, pt = timed(lambda: pld.pld_epsilon(more, delta))
    print(f"| the same plus one round, warm (prefix kept) | {rt:.3f} s | {pt:.2f} s | (no cache) |")
    target = p + 2.0
    s_rdp, rt = timed(lambda: rdp_calibrated(target, delta, rate, ROUNDS * STEPS, history))
    pld_epsilon_cold([], delta)
    s_pld, pt = timed(lambda: calibrate_noise(target, delta, rate, ROUNDS * STEPS, spent=history))
    print(f"| calibrate_noise for 30 more rounds (target eps {target:.2f}), cold | sigma {s_rdp:.3f} in {rt:.2f} s "
          f"| sigma {s_pld:.3f} in {pt:.2f} s | |")


def stability() -> None:
    print("| sample rate | noise | steps | RDP | PLD (ledger) | PLD time | PRV | PRV time |")
    print("|---|---|---|---|---|---|---|---|")
    for rate, steps in ((1e-3, 10_000), (1e-4, 100_000)):
        for sigma in (0.5, 0.8, 2.0, 10.0):
            history: History = [(sigma, rate, steps)]
            r = rdp_epsilon(history, 1e-6)
            p, pt = _guarded(lambda: pld_epsilon_cold(history, 1e-6))  # noqa: B023 - called at once
            v, vt = _guarded(lambda: prv_epsilon(history, 1e-6))  # noqa: B023 - called at once
            print(f"| {rate:g} | {sigma:g} | {steps} | {r:.4g} | {p} | {pt} | {v} | {vt} |")


def _guarded(function: Callable[[], float]) -> tuple[str, str]:
    """(value, seconds) as text, or the error's name where the accountant failed."""
    try:
        value, seconds = timed(function)
    except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure
        return f"error: {type(exc).__name__}", "-"
    return (f"{value:.4g}" if math.isfinite(value) else "inf"), f"{seconds:.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-stability", action="store_true")
    args = parser.parse_args()
    tightness()
    print()
    speed()
    if not args.skip_stability:
        print()
        stability()


if __name__ == "__main__":
    main()
