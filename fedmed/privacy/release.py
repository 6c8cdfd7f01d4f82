"""What a site sends besides its model update, and what each release costs.

DP-SGD covers the model update. Everything else a site could send is a statistic of its
patients too, so by default a site sends only:

* its **record count** (the training images or patients, the coordinator's averaging
  weight) with Gaussian noise, drawn once per run and stored in the ledger, so every round
  of the run resends the same noisy number at no further cost;
* its **validation counts** for each evaluated model: how many validation records fall in
  each score bin, per class, with Gaussian noise. Accuracy, balanced accuracy, sensitivity,
  specificity and a binned AUROC follow from them at the coordinator (``scores_from_counts``),
  for one site or for the sum over sites;
* the **public description of its guarantee** (status, whether DP, steps, epsilon, delta,
  noise multiplier): the parameters a DP guarantee is stated with. They follow from the
  site's settings, its ledger and its record count (the sampling rate of DP-SGD is the
  expected batch over the record count, as DP-SGD's accounting takes it). With its noisy
  validation counts it sends their noise's standard deviation (noise multiplier x
  sensitivity), another mechanism parameter, so that the coordinator can put an error bar
  on every score (``score_errors``) and say when a score is too noisy to read.

Each noisy release is a Gaussian mechanism, composed into the site's history as one
full-batch step ``(noise multiplier, 1.0, 1)``. Its noise multiplier is set so that the
run's planned releases, counted alone, cost ``release_share`` of what the run may spend:
the smaller of the site's target epsilon less what it spent before, and the per-run
ceiling ``max_epsilon_per_run`` less what the run spent by itself. DP-SGD's noise is then
calibrated with those releases reserved, so the site still ends the run at its target (or
its ceiling). A release that would pass ``max_epsilon`` or ``max_epsilon_per_run`` is not
made and spends nothing.

A release is made once per (run, round, statistic): its noisy values are stored in its
ledger line, and the same release asked again (an evaluation repeated, with the same or
another model) is answered with them, neither drawn nor paid again; a line from before the
values were stored answers nothing. An exact release of a (run, round, statistic) is
recorded once.

The exact training loss, exact counts and validation scores, and the seconds a round took
are withheld unless the site names them in ``release_exact``; then they are sent exactly
and each is recorded as a non-private release.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from fedmed.config import EXACT_RELEASES
from fedmed.numbers import finite_or_none
from fedmed.privacy.accounting import History, calibrate_noise, default_delta, epsilon, extend
from fedmed.privacy.budget import PrivacyConfig
from fedmed.privacy.ledger import LedgerError, LedgerRelease, PrivacyLedger, timestamp_now

log = logging.getLogger("fedmed")

# Interior edges of the score bins: equal steps in log-odds from -2 to 2, so 0.5 (the
# decision between two classes) is an edge. Six bins lose less than 0.01 of AUROC to
# binning and keep the noise they gather small (measured with typical site sizes).
SCORE_EDGES = 1.0 / (1.0 + np.exp(-np.linspace(-2.0, 2.0, 5)))
SCORE_BINS = len(SCORE_EDGES) + 1
COUNT = "examples"  # the record count
VALIDATION = "validation"  # the validation counts (or, exactly, the validation scores)


def planned_releases(evaluations: int, exact: frozenset[str]) -> int:
    """How many noisy releases a site makes in a run that evaluates ``evaluations`` models:
    its record count once and its validation counts of each evaluated model."""
    return (COUNT not in exact) + (0 if VALIDATION in exact else evaluations)


def release_noise(share: float, epsilon_room: float, delta: float, releases: int) -> float:
    """The noise multiplier of each of ``releases`` Gaussian releases that together cost
    ``share`` x ``epsilon_room`` at ``delta``, counted alone."""
    return calibrate_noise(share * epsilon_room, delta, 1.0, max(1, releases))


def reserved(noise_multiplier: float, releases: int) -> History:
    """The history of ``releases`` still to come, for calibrating DP-SGD around them."""
    return [(noise_multiplier, 1.0, releases)] if releases > 0 else []


def count_sensitivity(classes: int) -> float:
    """L2 change of the validation counts when one record (of weight at most 1) is added or
    removed: two classes need one score per record, more classes one per class plus the
    confusion matrix cell."""
    return 1.0 if classes == 2 else math.sqrt(classes + 1)


def counts_length(classes: int) -> int:
    """How many numbers the validation counts of a model with ``classes`` classes hold."""
    return 2 * SCORE_BINS if classes == 2 else classes * 2 * SCORE_BINS + classes * classes


def record_weights(patients: np.ndarray) -> np.ndarray:
    """Each validation image's weight when the record is a patient: one over the patient's
    images, so every patient adds at most 1 to the counts, whatever their number of images."""
    _, which, per_patient = np.unique(np.asarray(patients, dtype=str), return_inverse=True, return_counts=True)
    return 1.0 / per_patient[which]


def validation_counts(probabilities: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The weighted counts behind the validation scores, flat. Two classes: the bins of
    the positive class's probability for each true class (2 x bins). More classes: for
    each class, the bins of its probability for records of that class and of the others
    (classes x 2 x bins), then the confusion matrix (classes x classes)."""
    classes = probabilities.shape[1]
    labels = np.asarray(labels)
    if classes == 2:
        counts = np.zeros((2, SCORE_BINS))
        np.add.at(counts, (labels, _bins(probabilities[:, 1])), weights)
        return counts.ravel()
    per_class = np.zeros((classes, 2, SCORE_BINS))
    for c in range(classes):
        np.add.at(per_class[c], ((labels == c).astype(int), _bins(probabilities[:, c])), weights)  # a view
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (labels, probabilities.argmax(axis=1)), weights)
    return np.concatenate([per_class.ravel(), confusion.ravel()])


def scores_from_counts(counts: np.ndarray, classes: int) -> dict[str, float]:
    """Validation scores from (noisy) counts, as the site's ``val-`` metrics. Noise can make
    a count negative; counts are used as they are (clamping them would bias every score
    towards chance) and each score is kept within its range, or NaN where a class has no
    records left."""
    counts = np.asarray(counts, dtype=np.float64)
    if classes == 2:
        negative, positive = counts.reshape(2, SCORE_BINS)
        half = SCORE_BINS // 2  # bins above 0.5: predicted positive
        sensitivity = _ratio(positive[half:].sum(), positive.sum())
        specificity = _ratio(negative[:half].sum(), negative.sum())
        correct, total = positive[half:].sum() + negative[:half].sum(), counts.sum()
        recalls = [specificity, sensitivity]
        aurocs = [_binned_auroc(negative, positive)]
        extra = {"val-sensitivity": sensitivity, "val-specificity": specificity}
    else:
        per_class = counts[: classes * 2 * SCORE_BINS].reshape(classes, 2, SCORE_BINS)
        confusion = counts[classes * 2 * SCORE_BINS :].reshape(classes, classes)
        recalls = [_ratio(confusion[c, c], confusion[c].sum()) for c in range(classes)]
        correct, total = np.trace(confusion), confusion.sum()
        aurocs = [_binned_auroc(per_class[c, 0], per_class[c, 1]) for c in range(classes)]
        extra = {}
    return {
        "val-examples": max(0.0, float(total)),
        "val-accuracy": _ratio(correct, total),
        "val-balanced-accuracy": _mean(recalls),
        "val-auroc": _mean(aurocs),
        **extra,
    }


UNCERTAINTY_DRAWS = 200  # noise draws behind each standard error


def score_errors(counts: np.ndarray, noise_std: float, classes: int, seed: int = 0) -> dict[str, float]:
    """The standard error of each score of ``scores_from_counts`` that Gaussian noise of
    ``noise_std`` on every count causes, by parametric bootstrap: the counts redrawn with
    that noise, the scores recomputed, their spread. Post-processing of released values,
    so it costs no privacy; keys are the scores' with "-se" appended."""
    counts = np.asarray(counts, dtype=np.float64)
    rng = np.random.default_rng(seed)
    draws = [
        scores_from_counts(counts + rng.normal(0.0, noise_std, counts.shape), classes) for _ in range(UNCERTAINTY_DRAWS)
    ]
    errors = {}
    for key in draws[0]:
        values = np.array([d[key] for d in draws], dtype=np.float64)
        values = values[np.isfinite(values)]
        errors[f"{key}-se"] = float(values.std()) if len(values) > 1 else math.inf
    return errors


def _bins(scores: np.ndarray) -> np.ndarray:
    """Bin i holds scores in (edge i-1, edge i]; a score of exactly 0.5 counts as below it,
    as a tie goes to the first class when the most likely class is predicted."""
    return np.searchsorted(SCORE_EDGES, scores, side="left")


def _binned_auroc(negative: np.ndarray, positive: np.ndarray) -> float:
    """The Mann-Whitney AUROC of binned scores; records in one bin count as ties."""
    above = np.concatenate([np.cumsum(positive[::-1])[::-1][1:], [0.0]])
    return _ratio(float((negative * (above + positive / 2)).sum()), float(negative.sum() * positive.sum()))


def _ratio(part: float, whole: float) -> float:
    return min(1.0, max(0.0, part / whole)) if whole > 0 else math.nan


def _mean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


class SiteReleases:
    """One site's releases in one run, each recorded in the site's ledger as it is made.

    ``records`` is the number of protected training records (images or patients) and
    ``evaluations`` the number of models the run evaluates."""

    def __init__(
        self,
        ledger: PrivacyLedger,
        privacy: PrivacyConfig,
        site: str,
        run_id: str,
        *,
        unit: str,
        records: int,
        evaluations: int,
    ) -> None:
        self.ledger, self.privacy, self.site, self.run_id = ledger, privacy, site, run_id
        self.unit, self.records = unit, records
        self.exact = privacy.exact_releases if privacy.dp else frozenset(EXACT_RELEASES)
        self.delta = privacy.delta if privacy.delta is not None else default_delta(records)
        self.planned = planned_releases(evaluations, self.exact)

    def noise_multiplier(self) -> float | None:
        """The run's noise multiplier for releases: the one of its first release, else the
        one that makes the planned releases cost ``release_share`` of what the run may
        spend (the target less what the site spent before, or the per-run ceiling less what
        the run spent by itself, whichever is smaller: the larger noise); None when nothing
        is left."""
        earlier = self._run_releases(private=True)
        if earlier:
            return earlier[0].noise_multiplier
        room = self.privacy.target_epsilon - self.ledger.epsilon(self.delta)
        ceiling = self.privacy.max_epsilon_per_run
        if ceiling is not None:
            room = min(room, ceiling - epsilon(self.ledger.run_history(self.run_id), self.delta))
        try:
            return release_noise(self.privacy.release_share, room, self.delta, self.planned) if room > 0 else None
        except ValueError:  # so little room that no noise level fits
            return None

    def reserved(self) -> History:
        """The releases of this run still to come, to calibrate DP-SGD's noise around them."""
        with self.ledger.locked():
            left = self.planned - len(self._run_releases(private=True))
            sigma = self.noise_multiplier() if self.privacy.dp else None
            return [] if sigma is None else reserved(sigma, left)

    def count(self, round_number: int) -> float:
        """The record count to send: the run's noisy count, drawn at its first round and
        resent after; exact if the site releases it so. When the budget cannot pay for a
        noisy count, 1: a constant, which tells nothing (and weighs the site's update, noisy
        anyway with so little budget left, next to nothing)."""
        if COUNT in self.exact:
            self.record_exact(round_number, [COUNT])
            return float(self.records)
        with self.ledger.locked():
            earlier = [r for r in self._run_releases(private=True) if r.statistic == COUNT]
        if earlier:
            if earlier[0].value is None:  # a noisy count is always written with its value
                raise LedgerError(
                    f"site {self.site}: the noisy record count of run {self.run_id} in the ledger "
                    "holds no value; the ledger line is damaged"
                )
            return earlier[0].value
        noisy = self.noisy(round_number, COUNT, np.array([float(self.records)]), 1.0)
        return 1.0 if noisy is None else float(noisy[0])

    def noisy(self, round_number: int, statistic: str, values: np.ndarray, sensitivity: float) -> np.ndarray | None:
        """``values`` with Gaussian noise of std noise multiplier x ``sensitivity``, composed
        into the ledger; None (and nothing spent) if it would pass the site's budget or its
        per-run ceiling. Asked again for the same round and statistic, the values already
        sent, from the ledger: a second draw would be paid again and averaged away."""
        with self.ledger.locked():
            earlier = self.ledger.release(self.run_id, round_number, statistic, private=True)
            if earlier is not None:
                return self._stored(earlier, values.shape)
            sigma = None if self.ledger.non_private_rounds else self.noise_multiplier()
            if sigma is None:
                return None
            after_state = extend(self.ledger.history, sigma, 1.0, 1)
            after = self.ledger.epsilon_of(after_state, self.delta)
            if self.privacy.budget is not None and after > self.privacy.budget:
                return None
            ceiling = self.privacy.max_epsilon_per_run
            run_after = epsilon(extend(self.ledger.run_history(self.run_id), sigma, 1.0, 1), self.delta)
            if ceiling is not None and run_after > ceiling:
                log.warning(
                    "site %s withholds its %s release of round %s of run %s: the run's own epsilon would "
                    "reach %.3f, above the site's max_epsilon_per_run %g",
                    self.site,
                    statistic,
                    round_number,
                    self.run_id,
                    run_after,
                    ceiling,
                )
                return None
            noisy = values + np.random.default_rng().normal(0.0, sigma * sensitivity, size=values.shape)
            self.ledger.append(
                LedgerRelease(
                    site=self.site,
                    run_id=self.run_id,
                    round=round_number,
                    timestamp=timestamp_now(),
                    statistic=statistic,
                    private=True,
                    noise_multiplier=sigma,
                    sensitivity=sensitivity,
                    delta=self.delta,
                    epsilon=after,
                    accountant_state=after_state,
                    privacy_unit=self.unit,
                    value=float(noisy[0]) if statistic == COUNT else None,
                    values=[float(v) for v in noisy.ravel()],
                )
            )
        return noisy

    def noise_std(self, round_number: int, statistic: str) -> float | None:
        """The standard deviation of the noise on each value of a noisy release already made
        (noise multiplier x sensitivity): a parameter of the mechanism, public like the
        guarantee's, that lets a reader put an error bar on the released values."""
        with self.ledger.locked():
            release = self.ledger.release(self.run_id, round_number, statistic, private=True)
        return None if release is None else release.noise_multiplier * release.sensitivity

    def _stored(self, release: LedgerRelease, shape: tuple[int, ...]) -> np.ndarray | None:
        """The values a release already sent, in ``shape``; None (nothing sent again, nothing
        spent) when its line predates stored values or they do not fit the request."""
        stored = (
            release.values
            if release.values is not None
            else ([release.value] if release.statistic == COUNT and release.value is not None else None)
        )
        if stored is None or len(stored) != math.prod(shape):
            log.warning(
                "site %s: %s of round %s of run %s was released already and is not released again "
                "(its ledger line holds no values that fit this request)",
                self.site,
                release.statistic,
                release.round,
                self.run_id,
            )
            return None
        return np.asarray(stored, dtype=np.float64).reshape(shape)

    def record_exact(self, round_number: int, statistics: list[str]) -> None:
        """Record statistics sent exactly: non-private releases, spending nothing they could
        bound; each (run, round, statistic) once, however often it is sent."""
        with self.ledger.locked():
            for statistic in statistics:
                if self.ledger.release(self.run_id, round_number, statistic, private=False) is not None:
                    continue
                self.ledger.append(
                    LedgerRelease(
                        site=self.site,
                        run_id=self.run_id,
                        round=round_number,
                        timestamp=timestamp_now(),
                        statistic=statistic,
                        private=False,
                        noise_multiplier=0.0,
                        sensitivity=0.0,
                        delta=self.delta,
                        epsilon=finite_or_none(self.ledger.epsilon(self.delta)),
                        accountant_state=self.ledger.history,
                        privacy_unit=self.unit,
                    )
                )

    def _run_releases(self, private: bool) -> list[LedgerRelease]:
        return [r for r in self.ledger.releases if r.run_id == self.run_id and r.private == private]
