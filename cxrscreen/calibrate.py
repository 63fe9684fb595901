"""Threshold selection and operating-point metrics (pure functions on score lists).

Used by training (the validation-chosen threshold in the model card) and, later,
by ``cxrscreen calibrate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class OperatingPoint:
    """Binary metrics of a score list at one threshold (positive when score >= threshold)."""

    threshold: float
    n_positive: int
    n_negative: int
    tp: int
    fp: int
    tn: int
    fn: int
    auc: float

    @property
    def sensitivity(self) -> float:
        return self.tp / self.n_positive if self.n_positive else float("nan")

    @property
    def specificity(self) -> float:
        return self.tn / self.n_negative if self.n_negative else float("nan")

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if (self.tp + self.fp) else float("nan")

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / (self.n_positive + self.n_negative)

    @property
    def f1(self) -> float:
        p, r = self.precision, self.sensitivity
        return 2 * p * r / (p + r) if p + r else 0.0

    def to_json(self) -> dict:
        data = asdict(self)
        data.update(sensitivity=self.sensitivity, specificity=self.specificity, precision=self.precision,
                    accuracy=self.accuracy, f1=self.f1,
                    confusion_matrix={"rows": "true NORMAL, PNEUMONIA", "columns": "predicted NORMAL, PNEUMONIA",
                                      "values": [[self.tn, self.fp], [self.fn, self.tp]]})
        return data


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and labels must be 1-D and of the same length")
    return scores, labels


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    scores, labels = _check(scores, labels)
    pos, neg = scores[labels], scores[~labels]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    # average ranks for ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def threshold_for_sensitivity(scores, labels, target: float) -> float:
    """The highest threshold whose sensitivity (score >= threshold) is at least ``target``.

    Candidate thresholds are the positive scores themselves; ties are handled
    because every score equal to the threshold counts as positive.
    """
    scores, labels = _check(scores, labels)
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity {target} is outside (0, 1]")
    pos = np.sort(scores[labels])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases: sensitivity is undefined")
    needed = int(np.ceil(target * len(pos) - 1e-9))
    return float(pos[max(needed, 1) - 1])


def operating_point(scores, labels, threshold: float) -> OperatingPoint:
    scores, labels = _check(scores, labels)
    pred = scores >= threshold
    return OperatingPoint(threshold=float(threshold), n_positive=int(labels.sum()), n_negative=int((~labels).sum()),
                          tp=int((pred & labels).sum()), fp=int((pred & ~labels).sum()),
                          tn=int((~pred & ~labels).sum()), fn=int((~pred & labels).sum()),
                          auc=roc_auc(scores, labels))
