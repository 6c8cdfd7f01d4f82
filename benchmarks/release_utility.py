"""How far the validation scores the coordinator derives from the sites' noisy counts are
from the exact ones, and what the releases cost DP-SGD, for the shipped pneumonia scenario.

Usage: python benchmarks/release_utility.py [--sites 5] [--val-images 190] [--trials 300]

Scores are drawn as a model of AUROC about 0.9 would give them (two classes, 74% positive,
as in PneumoniaMNIST); each trial bins them into a site's validation counts
(``fedmed.privacy.release``), adds the Gaussian noise of the site's releases, and compares
the scores from the noisy counts with the exact ones: per site, and summed over the sites
as the coordinator combines them. The noise is that of the scenario's planned releases (a
record count and 7 validations over 30 rounds) at ``privacy.release_share`` of each target
epsilon; the DP-SGD noise multipliers are calibrated without and with those releases.
"""

from __future__ import annotations

import argparse

import numpy as np

from fedmed.metrics import classification_metrics
from fedmed.privacy.accounting import calibrate_noise, default_delta
from fedmed.privacy.release import release_noise, reserved, scores_from_counts, validation_counts

SHARE = 0.25  # privacy.release_share's default
RELEASES = 8  # the record count once, the validation of models 0, 5, ..., 30
TRAIN_IMAGES, BATCH, STEPS = 940, 64, 150  # a mid-sized site of the scenario: 30 rounds x 5 steps


def site_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(n) < 0.74).astype(int)
    logits = rng.normal(0.0, 1.5, n) + np.where(labels == 1, 1.6, -1.6)
    p = 1.0 / (1.0 + np.exp(-logits))
    return np.stack([1 - p, p], axis=1), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--val-images", type=int, default=190)
    parser.add_argument("--trials", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    delta = default_delta(TRAIN_IMAGES)
    print(f"{args.sites} sites x {args.val_images} validation images, {args.trials} trials; error = noisy - exact")
    print("epsilon  release noise  DP-SGD sigma (without -> with)  "
          "AUROC error sd: site / summed  balanced acc. error sd: site / summed")
    for target in (8.0, 3.0, 1.0):
        z = release_noise(SHARE, target, delta, RELEASES)
        without = calibrate_noise(target, delta, BATCH / TRAIN_IMAGES, STEPS)
        with_releases = calibrate_noise(target, delta, BATCH / TRAIN_IMAGES, STEPS, spent=reserved(z, RELEASES))
        errors = {key: [] for key in ("site_auroc", "all_auroc", "site_bacc", "all_bacc")}
        for _ in range(args.trials):
            sites = [site_scores(rng, args.val_images) for _ in range(args.sites)]
            exact_counts = [validation_counts(p, y, np.ones(len(y))) for p, y in sites]
            noisy_counts = [c + rng.normal(0.0, z, c.shape) for c in exact_counts]
            exact_site = classification_metrics(sites[0][1], sites[0][0])
            noisy_site = scores_from_counts(noisy_counts[0], 2)
            everything = classification_metrics(np.concatenate([y for _, y in sites]),
                                                 np.concatenate([p for p, _ in sites]))
            noisy_all = scores_from_counts(sum(noisy_counts), 2)
            errors["site_auroc"].append(noisy_site["val-auroc"] - exact_site["auroc"])
            errors["all_auroc"].append(noisy_all["val-auroc"] - everything["auroc"])
            errors["site_bacc"].append(noisy_site["val-balanced-accuracy"] - exact_site["balanced_accuracy"])
            errors["all_bacc"].append(noisy_all["val-balanced-accuracy"] - everything["balanced_accuracy"])
        sd = {key: float(np.nanstd(values)) for key, values in errors.items()}
        bias = float(np.nanmean(errors["all_auroc"]))
        print(f"{target:>7g}  {z:>13.2f}  {without:>13.3f} -> {with_releases:.3f} ({with_releases / without - 1:+.1%})"
              f"  {sd['site_auroc']:>17.3f} / {sd['all_auroc']:.3f} (summed bias {bias:+.3f})"
              f"  {sd['site_bacc']:>13.3f} / {sd['all_bacc']:.3f}")


if __name__ == "__main__":
    main()
