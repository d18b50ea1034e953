"""Uncertainty of the report's figures, from the per-item data kept in the results store.

- Perplexity: every window's mean token NLL is stored; perplexity is exp(mean over windows) (windows have the
  same length), so a percentile bootstrap over windows gives its interval, and a paired bootstrap over the same
  windows gives the interval of a difference in log-perplexity between two models.
- Zero-shot: every document's correctness and log-likelihood margin (gold choice minus the best wrong one) are
  stored; their means have lm-eval's standard error (sample standard deviation / sqrt(n)), and a difference
  between two models is bootstrapped over the same documents, each task resampled on its own (stratified) so a
  task's weight in the mean stays fixed. The margin is continuous, so its paired difference resolves far
  smaller effects than 0/1 correctness does on the same documents.
- A difference is *resolved* when its 95% interval excludes zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0  # a fixed seed: the report is a function of the records alone


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def resolved(self) -> bool:
        """The interval of a difference excludes zero."""
        return self.low > 0 or self.high < 0


def _percentiles(samples: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def _resample_means(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """RESAMPLES bootstrap means of `values` (resampled along the first axis)."""
    idx = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    return values[idx].mean(axis=1)


def perplexity_interval(window_nll: Sequence[float]) -> Interval:
    """Perplexity with its 95% percentile-bootstrap interval over windows."""
    nll = np.asarray(window_nll, dtype=np.float64)
    low, high = _percentiles(np.exp(_resample_means(nll, np.random.default_rng(SEED))))
    return Interval(math.exp(nll.mean()), low, high)


def paired_log_ppl_difference(nll_a: Sequence[float], nll_b: Sequence[float]) -> Interval:
    """log ppl(a) - log ppl(b) over the same windows, with a 95% paired-bootstrap interval."""
    a, b = np.asarray(nll_a, dtype=np.float64), np.asarray(nll_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired windows differ in number: {a.shape[0]} vs {b.shape[0]}")
    diff = a - b
    return Interval(float(diff.mean()), *_percentiles(_resample_means(diff, np.random.default_rng(SEED))))


def mean_stderr(values: Sequence[float]) -> float:
    """lm-eval's standard error of a mean: sample standard deviation / sqrt(n)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else float("nan")


def task_mean_stderr(stderrs: Sequence[float]) -> float:
    """Standard error of the unweighted mean of independent per-task means (accuracies or margins)."""
    return math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)


def paired_document_difference(tasks_a: Sequence[Sequence[float]], tasks_b: Sequence[Sequence[float]]) -> Interval:
    """Mean over tasks of the per-document mean of a - b (correctness or margin), each task paired over its
    documents; 95% stratified paired bootstrap."""
    if len(tasks_a) != len(tasks_b) or not tasks_a:
        raise ValueError("a paired zero-shot difference needs the same, non-empty list of tasks for both models")
    rng = np.random.default_rng(SEED)
    estimate, samples = 0.0, np.zeros(RESAMPLES)
    for a, b in zip(tasks_a, tasks_b):
        diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        if len(a) != len(b):
            raise ValueError(f"paired documents differ in number: {len(a)} vs {len(b)}")
        estimate += diff.mean()
        samples += _resample_means(diff, rng)
    n = len(tasks_a)
    return Interval(estimate / n, *_percentiles(samples / n))
