"""Sequential calibration: the inputs of one decoder block at a time, and statistics of linears' inputs.

Block k+1 is calibrated on the outputs of the already-pruned block k (SparseGPT/Wanda/FASP order).
Statistics accumulate batch by batch; the tokens are never concatenated into one matrix.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn


class _Captured(Exception):
    pass


@dataclass
class BlockInputs:
    """Hidden states entering the current block (one tensor per batch) and the block's keyword arguments.

    The hidden states live on `storage` (the compute device, or the CPU when they do not fit there); each
    batch visits the compute device only while a block runs on it.
    """

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    device: torch.device = torch.device("cpu")  # where blocks run
    storage: torch.device = torch.device("cpu")  # where hidden states wait between blocks

    def copy(self) -> BlockInputs:
        """A second stream of the same hidden states (blocks replace them, never modify them in place)."""
        return BlockInputs(list(self.hidden), self.kwargs, self.device, self.storage)

    def batches(self) -> Iterable[tuple[torch.Tensor, dict]]:
        for hidden, kwargs in zip(self.hidden, self.kwargs):
            yield hidden.to(self.device), kwargs


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Iterable[torch.Tensor],
                         device: torch.device, storage: torch.device | None = None) -> BlockInputs:
    """Run the model only up to its first block; keep what that block receives."""
    inputs = BlockInputs([], [], device, storage or device)

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: _to(v, device) for k, v in kwargs.items() if k != "hidden_states"}
        inputs.hidden.append(hidden.to(inputs.storage))
        inputs.kwargs.append(kwargs)
        raise _Captured

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    model_device = model.get_input_embeddings().weight.device  # in streaming, the blocks are not loaded yet
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(model_device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> None:
    """Replace the inputs by the block's outputs, batch by batch."""
    for i, (hidden, kwargs) in enumerate(inputs.batches()):
        inputs.hidden[i] = _first(block(hidden, **kwargs)).to(inputs.storage)


@dataclass
class _Moments:
    """Sums over one set of tokens: count, first and second moments, and optionally X^T X and X^T X_dense."""

    count: int = 0
    sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = field(default=None, repr=False)
    cross: torch.Tensor | None = field(default=None, repr=False)
    dense_sum: torch.Tensor | None = None
    relative_sq_sum: torch.Tensor | None = None  # sum over tokens of x_tj^2 / ||h_t||^2 (block input h)

    def update(self, x: torch.Tensor, with_gram: bool, dense: torch.Tensor | None,
               residual_sq: torch.Tensor | None = None) -> None:
        if x.shape[0] == 0:
            return
        if self.sum is None:
            n = x.shape[1]
            self.sum = x.new_zeros(n, dtype=torch.float64)
            self.sq_sum = x.new_zeros(n, dtype=torch.float64)
            if with_gram:
                self.gram = x.new_zeros(n, n, dtype=torch.float64)
            if dense is not None:
                self.cross = x.new_zeros(n, n, dtype=torch.float64)
                self.dense_sum = x.new_zeros(n, dtype=torch.float64)
            if residual_sq is not None:
                self.relative_sq_sum = x.new_zeros(n, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0).double()
        self.sq_sum += x.square().sum(0).double()
        if with_gram:
            _add_products(self.gram, x, x)
        if dense is not None:
            _add_products(self.cross, x, dense)
            self.dense_sum += dense.sum(0).double()
        if residual_sq is not None:
            self.relative_sq_sum += (x.square() / residual_sq.to(x.dtype)[:, None]).sum(0).double()


_PRODUCT_ROWS = 1024  # rows of X^T Y formed at once: a [1024, n] float64 block, not a second [n, n] matrix


def _add_products(total: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """total += x^T y: products in x's precision (fp32, or fp64 for fp64 inputs), summed in float64, a block of
    rows at a time. Forming the whole [n, n] product first would hold it twice more (fp32, then its fp64
    copy): 1 GB beside the Gram of an 8960-wide FFN input. For x^T x (y is x) only the blocks on and right of
    the diagonal are formed and the rest mirrored: 56% of the products for n = 8960, where they are most of a
    CPU prune's time."""
    n = x.shape[1]
    for start in range(0, n, _PRODUCT_ROWS):
        end = min(start + _PRODUCT_ROWS, n)
        if y is x:
            block = (x[:, start:end].T @ x[:, start:]).double()
            total[start:end, start:] += block
            total[end:, start:end] += block[:, end - start:].T
        else:
            total[start:end] += (x[:, start:end].T @ y).double()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _total(parts: list[_Moments], name: str):
    values = [getattr(part, name) for part in parts if getattr(part, name) is not None]
    if not values:
        return None
    return values[0] if len(values) == 1 else sum(values[1:], values[0].clone())


@dataclass
class InputStats:
    """Running statistics of one linear's input channels over all calibration tokens (float64).

    with_gram: keep G = X^T X. Given the same tokens' input in the dense model (`update(x, dense)`), also
    X^T X_dense and the dense sums (restoration onto the dense model's outputs). folds > 1: keep the sums of
    each fold of calibration windows apart (window w in fold w % folds), for choices validated on held-out
    calibration windows; the totals are summed on demand, so folds cost no extra memory once pruning is done.
    """

    with_gram: bool
    folds: int = 1
    parts: list[_Moments] = field(default_factory=list, repr=False)
    windows_seen: int = 0

    def __post_init__(self):
        self.parts = self.parts or [_Moments() for _ in range(self.folds)]

    def update(self, x: torch.Tensor, dense: torch.Tensor | None = None, windows: int | None = None,
               residual_sq: torch.Tensor | None = None) -> None:
        """x: [windows, tokens, channels], or any shape holding `windows` windows' tokens in order (a 2-D
        x without `windows` is one window); dense: the same tokens' input in the dense model; residual_sq:
        [windows, tokens], each token's squared norm of the block input (for `relative_sq_sum`)."""
        if windows is None:
            windows = x.shape[0] if x.dim() > 2 else 1
        x = _at_least_fp32(x).reshape(windows, -1, x.shape[-1])
        dense = None if dense is None else _at_least_fp32(dense).reshape(x.shape)
        for fold, part in enumerate(self.parts):
            rows = slice((fold - self.windows_seen) % self.folds, None, self.folds)
            part.update(x[rows].reshape(-1, x.shape[-1]), self.with_gram,
                        None if dense is None else dense[rows].reshape(-1, x.shape[-1]),
                        None if residual_sq is None else residual_sq[rows].reshape(-1))
        self.windows_seen += x.shape[0]

    def fold(self, k: int) -> InputStats:
        """The statistics of fold k alone."""
        return InputStats(self.with_gram, 1, [self.parts[k]])

    @property
    def count(self) -> int:
        return sum(part.count for part in self.parts)

    @property
    def sum(self) -> torch.Tensor:
        return _total(self.parts, "sum")

    @property
    def sq_sum(self) -> torch.Tensor:
        return _total(self.parts, "sq_sum")

    @property
    def gram(self) -> torch.Tensor | None:
        return _total(self.parts, "gram")

    @property
    def cross(self) -> torch.Tensor | None:
        """X^T X_dense: this (pruned-model) input against the dense model's input, same tokens."""
        return _total(self.parts, "cross")

    @property
    def dense_sum(self) -> torch.Tensor | None:
        return _total(self.parts, "dense_sum")

    @property
    def relative_sq_sum(self) -> torch.Tensor | None:
        """Sum over tokens of x_tj^2 / ||h_t||^2: each channel's energy relative to the residual stream entering
        the block, token by token (collected with `relative=True`)."""
        return _total(self.parts, "relative_sq_sum")

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def norm(self) -> torch.Tensor:
        """‖X_j‖₂ over all calibration tokens."""
        return self.sq_sum.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of each channel over the calibration tokens."""
        return (self.sq_sum - self.count * self.mean.square()) / max(self.count - 1, 1)


@torch.no_grad()
def collect_input_stats(block: nn.Module, inputs: BlockInputs, linears: list[str], with_gram: bool,
                        advance: bool = False, dense_inputs: BlockInputs | None = None,
                        folds: int = 1, relative: bool = False,
                        output_norms: dict[str, str] | None = None) -> dict[str, InputStats]:
    """One pass of the (unpruned) block over all inputs, accumulating statistics of each named linear's
    input. With `advance`, the inputs are replaced by the block's outputs in the same pass. With
    `dense_inputs` (the same windows' inputs in the dense model), the block runs on those too, which also
    advances them, and each linear's statistics pair its input with its dense-model input. With `relative`,
    each token's input is also weighed against the block input's norm at that token (`relative_sq_sum`);
    a linear named in `output_norms` (linear -> norm module) is weighed by that norm's gain at the token too,
    ||norm(y_t)||^2 / ||y_t||^2 for its output y, since the norm rescales what the linear adds to the stream."""
    stats = {name: InputStats(with_gram, folds) for name in linears}
    seen: dict[str, torch.Tensor] = {}  # each linear's input in the pass just run
    handles = [block.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, name=name: seen.__setitem__(name, args[0])) for name in linears]
    gains: dict[str, torch.Tensor] = {}  # per token: the output norm's squared gain, in the pass just run
    norms = {linear: norm for linear, norm in (output_norms or {}).items() if relative and linear in linears}
    handles += [block.get_submodule(norm).register_forward_hook(
        lambda _m, args, out, name=linear: gains.__setitem__(name, _squared_gain(args[0], out)))
        for linear, norm in norms.items()]
    try:
        dense_batches = dense_inputs.batches() if dense_inputs is not None else None
        for i, (hidden, kwargs) in enumerate(inputs.batches()):
            out = block(hidden, **kwargs)
            pruned_seen, pruned_gains = dict(seen), dict(gains)
            dense_seen: dict[str, torch.Tensor | None] = dict.fromkeys(linears)
            if dense_batches is not None:
                dense_hidden, dense_kwargs = next(dense_batches)
                dense_inputs.hidden[i] = _first(block(dense_hidden, **dense_kwargs)).to(dense_inputs.storage)
                dense_seen = dict(seen)
            residual_sq = _token_energy(hidden).clamp_min(1e-30) if relative else None
            for name in linears:  # some families (OPT) flatten windows before a linear: give the count
                # an output norm's gain g scales what reaches the stream: x^2 * g / ||h||^2 = x^2 / (||h||^2 / g)
                stream_sq = residual_sq / pruned_gains[name] if name in norms else residual_sq
                stats[name].update(pruned_seen[name], dense_seen[name], windows=hidden.shape[0], residual_sq=stream_sq)
            if advance:
                inputs.hidden[i] = _first(out).to(inputs.storage)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _token_energy(x: torch.Tensor) -> torch.Tensor:
    """||x_t||^2 per token (in float32: a bf16 sum of squares loses the small tokens)."""
    return x.float().square().sum(-1)


def _squared_gain(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Per token, how much a norm scales the energy of its input: ||out_t||^2 / ||x_t||^2."""
    return (_token_energy(out) / _token_energy(x).clamp_min(1e-30)).clamp_min(1e-30)


def _first(out):
    return out[0] if isinstance(out, tuple) else out
