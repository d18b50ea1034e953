"""Bootstrap intervals against synthetic data whose truth is known."""

import math

import numpy as np
import pytest

from fasp_bench import stats


def test_paired_interval_covers_a_known_difference_and_excludes_zero():
    rng = np.random.default_rng(1)
    a = rng.normal(3.5, 0.4, size=64)  # windows vary far more than the difference between the models
    b = a + 0.05 + rng.normal(0, 0.02, size=64)
    d = stats.paired_log_ppl_difference(a, b)
    assert d.low < -0.05 < d.high and d.resolved
    assert d.estimate == pytest.approx(float(np.mean(a - b)))
    unpaired = np.percentile([rng.choice(a, 64).mean() - rng.choice(b, 64).mean() for _ in range(2000)], [2.5, 97.5])
    assert unpaired[0] < 0 < unpaired[1]  # the same data without pairing cannot resolve it


def test_identical_inputs_give_an_interval_that_contains_zero():
    a = np.random.default_rng(2).normal(3.0, 0.3, size=32)
    d = stats.paired_log_ppl_difference(a, a.copy())
    assert d.low <= 0 <= d.high and not d.resolved
    docs = [[1, 0, 1, 1, 0], [0, 0, 1]]
    acc = stats.paired_document_difference(docs, docs)
    assert acc.low <= 0 <= acc.high and not acc.resolved


def test_paired_interval_has_about_95_percent_coverage():
    rng = np.random.default_rng(3)
    covered = 0
    for _ in range(200):
        a = rng.normal(3.0, 0.5, size=40)
        d = stats.paired_log_ppl_difference(a, a + 0.03 + rng.normal(0, 0.05, size=40))
        covered += d.low <= -0.03 <= d.high
    assert 0.88 <= covered / 200 <= 0.99


def test_perplexity_interval_brackets_exp_mean_nll():
    nll = np.random.default_rng(4).normal(3.4, 0.3, size=50)
    ci = stats.perplexity_interval(nll)
    assert ci.estimate == pytest.approx(math.exp(nll.mean()))
    assert ci.low < ci.estimate < ci.high
    assert stats.perplexity_interval([2.0] * 10).low == pytest.approx(math.exp(2.0))  # no spread, no width


def test_accuracy_difference_is_stratified_by_task():
    rng = np.random.default_rng(5)
    task_a = [rng.integers(0, 2, size=400).tolist(), rng.integers(0, 2, size=50).tolist()]
    task_b = [[1 - x if i % 5 == 0 else x for i, x in enumerate(t)] for t in task_a]  # flips 20% of each task
    d = stats.paired_document_difference(task_a, task_b)
    expected = np.mean([np.mean(np.subtract(a, b)) for a, b in zip(task_a, task_b)])  # tasks weigh equally
    assert d.estimate == pytest.approx(expected)
    assert d.low <= d.estimate <= d.high
    assert stats.mean_stderr([1, 0, 1, 0]) == pytest.approx(math.sqrt(0.25 * 4 / 3 / 4))
    assert stats.task_mean_stderr([0.03, 0.04]) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="differ in number"):
        stats.paired_log_ppl_difference([1.0, 2.0], [1.0])


def test_paired_margins_resolve_a_shift_that_accuracy_on_the_same_documents_cannot():
    """Per-document margins (gold minus best wrong log-likelihood) of two models that differ by a known small
    shift: the paired interval covers the shift and excludes zero, while the 0/1 correctness the same margins
    imply (margin > 0) resolves nothing on the same documents."""
    rng = np.random.default_rng(6)
    shift = 0.04
    tasks_a = [rng.normal(0.3, 1.5, size=n) for n in (500, 500, 300)]  # documents vary far more than the models
    tasks_b = [a - shift + rng.normal(0, 0.4, size=len(a)) for a in tasks_a]
    d = stats.paired_document_difference(tasks_a, tasks_b)
    assert d.low < shift < d.high and d.resolved
    acc = stats.paired_document_difference([(a > 0).astype(float) for a in tasks_a],
                                           [(b > 0).astype(float) for b in tasks_b])
    assert not acc.resolved  # (at this seed; over seeds accuracy resolves this shift about half the time)
    same = stats.paired_document_difference(tasks_a, [a.copy() for a in tasks_a])
    assert same.low <= 0 <= same.high and not same.resolved
