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
        out = block(hidden, **kwargs)
        inputs.hidden[i] = (out[0] if isinstance(out, tuple) else out).to(inputs.storage)


@dataclass
class InputStats:
    """Running statistics of one linear's input channels over all calibration tokens (float64)."""

    with_gram: bool
    count: int = 0
    sum: torch.Tensor | None = None
    sq_sum: torch.Tensor | None = None
    gram: torch.Tensor | None = field(default=None, repr=False)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if self.sum is None:
            n = x.shape[1]
            self.sum = x.new_zeros(n, dtype=torch.float64)
            self.sq_sum = x.new_zeros(n, dtype=torch.float64)
            if self.with_gram:
                self.gram = x.new_zeros(n, n, dtype=torch.float64)
        self.count += x.shape[0]
        self.sum += x.sum(0).double()
        self.sq_sum += x.square().sum(0).double()
        if self.with_gram:
            self.gram += (x.T @ x).double()  # fp32 products per batch, fp64 running sum

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
                        advance: bool = False) -> dict[str, InputStats]:
    """One pass of the (unpruned) block over all inputs, accumulating statistics of each named linear's
    input. With `advance`, the inputs are replaced by the block's outputs in the same pass."""
    stats = {name: InputStats(with_gram) for name in linears}
    handles = [
        block.get_submodule(name).register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0]))
        for name in linears
    ]
    try:
        if advance:
            run_block(block, inputs)
        else:
            for hidden, kwargs in inputs.batches():
                block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return stats
