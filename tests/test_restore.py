"""FASP's restoration is the least-squares optimum computed from the Gram matrix alone."""

import torch

from pruning.calibrate import InputStats
from pruning.methods.fasp import restore_least_squares


def _layer_problem(n_tokens=400, d_in=24, d_out=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n_tokens, d_in, generator=g, dtype=torch.float64) @ mixing  # correlated channels
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    keep = torch.tensor(sorted(torch.randperm(d_in, generator=g)[:15].tolist()))
    return x, w, keep


def test_gram_accumulated_in_batches_equals_xtx():
    x, _, _ = _layer_problem()
    stats = InputStats(with_gram=True)
    for batch in x.float().split(37):
        stats.update(batch.view(1, -1, x.shape[1]))
    xf = x.float().double()
    torch.testing.assert_close(stats.gram, xf.T @ xf, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.norm, xf.norm(dim=0), rtol=1e-6, atol=1e-6)
    assert stats.count == x.shape[0]


def test_restoration_matches_lstsq():
    x, w, keep = _layer_problem()
    restored = restore_least_squares(w, x.T @ x, keep, damping=0.0)
    reference = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(restored, reference, rtol=1e-8, atol=1e-8)


def test_both_damping_forms_tend_to_lstsq_and_to_their_priors():
    x, w, keep = _layer_problem()
    gram = x.T @ x
    reference = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    for toward in ("original", "zero"):
        tiny = restore_least_squares(w, gram, keep, damping=1e-9, toward=toward)
        torch.testing.assert_close(tiny, reference, rtol=1e-5, atol=1e-5)
    huge = 1e9
    torch.testing.assert_close(restore_least_squares(w, gram, keep, huge, "original"), w[:, keep], rtol=1e-6, atol=1e-6)
    assert restore_least_squares(w, gram, keep, huge, "zero").abs().max() < 1e-6


def test_restoration_lowers_the_output_error():
    x, w, keep = _layer_problem()
    target = x @ w.T
    restored = restore_least_squares(w.float(), (x.T @ x).float(), keep)  # default damping, fp32 weights
    err_restored = (x[:, keep] @ restored.double().T - target).norm()
    err_sliced = (x[:, keep] @ w[:, keep].T - target).norm()
    assert err_restored < 0.8 * err_sliced
