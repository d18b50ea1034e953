"""Least-squares restoration from calibration statistics alone, checked against torch.linalg.lstsq on explicit
token matrices: FASP's pruned target, the dense target, the intercept, and the held-out damping choice."""

import pytest
import torch

from pruning import restoration
from pruning.calibrate import InputStats
from pruning.errors import PruningError


def _layer_problem(n_tokens=400, d_in=24, d_out=10, seed=0, correlated=True):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n_tokens, d_in, generator=g, dtype=torch.float64)
    x = x @ mixing if correlated else x
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    keep = torch.tensor(sorted(torch.randperm(d_in, generator=g)[:15].tolist()))
    return x, w, keep


def _stats(x, dense=None, folds=1, windows=8):
    """Statistics of x fed as `windows` windows, as the calibration hooks feed them."""
    stats = InputStats(with_gram=True, folds=folds)
    stats.update(x.view(windows, -1, x.shape[1]), None if dense is None else dense.view(windows, -1, x.shape[1]))
    return stats


def test_statistics_accumulated_in_batches_equal_the_token_matrices():
    x, _, _ = _layer_problem()
    xd = x + 0.1 * torch.randn_like(x)
    residual_sq = torch.rand(8, 50, generator=torch.Generator().manual_seed(4), dtype=x.dtype) + 0.5
    stats = InputStats(with_gram=True, folds=2)
    for batch, dense, res in zip(x.view(8, 50, -1).split(3), xd.view(8, 50, -1).split(3), residual_sq.split(3)):
        stats.update(batch.float(), dense.float(), residual_sq=res)  # windows 0-2, 3-5, 6-7
    xf, xdf = x.float().double(), xd.float().double()
    torch.testing.assert_close(stats.gram, xf.T @ xf, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.cross, xf.T @ xdf, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.dense_sum, xdf.sum(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(stats.norm, xf.norm(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.relative_sq_sum, (xf.square() / residual_sq.reshape(-1, 1)).sum(0), rtol=1e-5,
                               atol=1e-4)
    assert stats.count == x.shape[0]
    # fold k holds the windows w with w % 2 == k, wherever the batches split them
    even = xf.view(8, 50, -1)[0::2].reshape(-1, x.shape[1])
    torch.testing.assert_close(stats.fold(0).gram, even.T @ even, rtol=1e-5, atol=1e-3)
    assert stats.fold(0).count == stats.fold(1).count == 200


def test_pruned_target_matches_lstsq():
    x, w, keep = _layer_problem()
    restored, bias = restoration.restore(w, None, _stats(x), keep, damping=0.0)
    reference = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    torch.testing.assert_close(restored, reference, rtol=1e-8, atol=1e-8)
    assert bias is None


def test_dense_target_matches_lstsq_on_the_dense_inputs():
    x, w, keep = _layer_problem()
    xd = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype) @ x[:24]
    restored, _ = restoration.restore(w, None, _stats(x, xd), keep, damping=0.0, target="dense")
    reference = torch.linalg.lstsq(x[:, keep], xd @ w.T).solution.T
    torch.testing.assert_close(restored, reference, rtol=1e-7, atol=1e-7)


def test_intercept_matches_lstsq_with_a_ones_column():
    x, w, keep = _layer_problem()
    x = x + 3.0  # inputs with non-zero means
    b = torch.randn(w.shape[0], dtype=x.dtype)
    xd = x * 1.1 - 0.2
    for target, x_target in (("pruned", x), ("dense", xd)):
        restored, bias = restoration.restore(w, b, _stats(x, xd), keep, damping=0.0, target=target, intercept=True)
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype)
        solution = torch.linalg.lstsq(torch.cat([x[:, keep], ones], 1), x_target @ w.T + b).solution
        torch.testing.assert_close(restored, solution[:-1].T, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(bias, solution[-1], rtol=1e-7, atol=1e-7)


def test_intercept_reproduces_the_dense_output_when_the_removed_inputs_are_constant():
    """FLAP's exactness case: a removed channel that is constant over the tokens is absorbed into the bias,
    exactly, even with the default damping (its prior, the original weights, is then the exact solution)."""
    x, w, keep = _layer_problem()
    removed = torch.tensor([j for j in range(x.shape[1]) if j not in keep.tolist()])
    x[:, removed] = torch.linspace(-2, 2, len(removed), dtype=x.dtype)
    b = torch.randn(w.shape[0], dtype=x.dtype)
    restored, bias = restoration.restore(w, b, _stats(x), keep, damping=0.1, intercept=True)
    torch.testing.assert_close(x[:, keep] @ restored.T + bias, x @ w.T + b, rtol=1e-9, atol=1e-9)
    sliced, _ = restoration.restore(w, b, _stats(x), keep, damping=0.1)
    assert (x[:, keep] @ sliced.T + b - x @ w.T - b).abs().max() > 1e-3  # without it, not exact


def test_both_damping_forms_tend_to_lstsq_and_to_their_priors():
    x, w, keep = _layer_problem()
    stats = _stats(x)
    reference = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
    for toward in ("original", "zero"):
        tiny, _ = restoration.restore(w, None, stats, keep, damping=1e-9, toward=toward)
        torch.testing.assert_close(tiny, reference, rtol=1e-5, atol=1e-5)
    huge = 1e9
    original, _ = restoration.restore(w, None, stats, keep, huge, "original")
    torch.testing.assert_close(original, w[:, keep], rtol=1e-6, atol=1e-6)
    assert restoration.restore(w, None, stats, keep, huge, "zero")[0].abs().max() < 1e-6


def test_restoration_lowers_the_output_error():
    x, w, keep = _layer_problem()
    target = x @ w.T
    restored, _ = restoration.restore(w.float(), None, _stats(x.float()), keep)  # default damping, fp32 weights
    err_restored = (x[:, keep] @ restored.double().T - target).norm()
    err_sliced = (x[:, keep] @ w[:, keep].T - target).norm()
    assert err_restored < 0.8 * err_sliced


def _explicit_heldout_choice(x, xd, w, b, keep, intercept, grid):
    """The damping with the least error on held-out windows, each fold fitted by lstsq on explicit matrices:
    ridge toward the original weights as least squares on rows augmented with sqrt(lambda) (I, W_S^T)."""
    windows = x.view(8, -1, x.shape[1])
    dense = xd.view(8, -1, x.shape[1])
    folds = [(windows[k::2].reshape(-1, x.shape[1]), dense[k::2].reshape(-1, x.shape[1])) for k in range(2)]
    errors = []
    for damping in grid:
        total = 0.0
        for k in range(2):
            (fit_x, fit_xd), (held_x, held_xd) = folds[1 - k], folds[k]
            design = fit_x[:, keep]
            lam = damping * (design.T @ design).diagonal().mean()
            k_cols = len(keep)
            extra = torch.sqrt(lam) * torch.eye(k_cols, dtype=x.dtype)
            prior = torch.sqrt(lam) * w[:, keep].T
            if intercept:
                design = torch.cat([design, torch.ones(len(design), 1, dtype=x.dtype)], 1)
                extra = torch.cat([extra, torch.zeros(k_cols, 1, dtype=x.dtype)], 1)
            theta = torch.linalg.lstsq(torch.cat([design, extra]), torch.cat([fit_xd @ w.T + b, prior])).solution
            held = held_x[:, keep]
            prediction = held @ theta[:k_cols] + (theta[k_cols] if intercept else b)
            total += (prediction - (held_xd @ w.T + b)).square().sum().item()
        errors.append(total)
    return grid[min(range(len(grid)), key=errors.__getitem__)]


@pytest.mark.parametrize("n_tokens, noise, correlated, best", [(80, 3.0, False, 100.0), (4000, 0.0, True, 1e-4)])
def test_held_out_damping_choice_matches_explicit_cross_validation(n_tokens, noise, correlated, best):
    """The choice from fold statistics equals 2-fold cross-validation done on the token matrices. Independent
    channels and a noisy target: the kept columns cannot explain the cut ones, so the original weights are the
    best fit and the strongest damping toward them wins; many clean correlated tokens: the plain fit wins."""
    x, w, keep = _layer_problem(n_tokens=n_tokens, correlated=correlated)
    g = torch.Generator().manual_seed(5)
    xd = x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
    b = torch.randn(w.shape[0], generator=g, dtype=x.dtype)
    grid = (1e-4, 1e-2, 1.0, 100.0)
    for intercept in (False, True):
        chosen = restoration.choose_damping(w, b, _stats(x, xd, folds=2), keep, "dense", intercept, "original", grid)
        assert chosen == _explicit_heldout_choice(x, xd, w, b, keep, intercept, grid)
        assert chosen == best


def test_damping_choice_needs_folds_and_dense_target_needs_dense_inputs():
    x, w, keep = _layer_problem()
    with pytest.raises(PruningError, match="folds"):
        restoration.choose_damping(w, None, _stats(x), keep, "pruned", False, "original")
    with pytest.raises(PruningError, match="dense model's inputs"):
        restoration.restore(w, None, _stats(x), keep, target="dense")


def test_gram_and_cross_gram_summed_a_block_of_rows_at_a_time_equal_the_whole_products(monkeypatch):
    from pruning import calibrate

    monkeypatch.setattr(calibrate, "_PRODUCT_ROWS", 7)  # 24 channels: blocks of 7, 7, 7 and 3 rows
    x, _, _ = _layer_problem()
    xd = x + 0.1 * torch.randn_like(x)
    stats = _stats(x, xd)
    torch.testing.assert_close(stats.gram, x.T @ x)
    torch.testing.assert_close(stats.cross, x.T @ xd)


def test_singular_equations_without_damping_fall_back_to_the_least_norm_fit():
    """A kept input that is always zero makes G[S, S] singular at damping 0: the in-place factorisation fails,
    and the fit is the least-norm least-squares solution, as lstsq gives it."""
    x, w, keep = _layer_problem()
    x[:, keep[3]] = 0.0
    restored, _ = restoration.restore(w, None, _stats(x), keep, damping=0.0)
    reference = torch.linalg.lstsq(x[:, keep], x @ w.T, driver="gelsd").solution.T
    torch.testing.assert_close(restored, reference, rtol=1e-6, atol=1e-6)
    assert restored[:, 3].abs().max() < 1e-6  # the dead input gets no weight
