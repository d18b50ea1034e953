"""Pruning a checkpoint larger than memory: one decoder block at a time, from safetensors shards to shards.

The model is built without weights (accelerate's empty-weights init); embeddings, final norm and head are
read up front; each block is read from the source shards when its turn comes, pruned on the device, written
to its own output shard and returned to the meta device. Peak host memory is about embeddings + one block
+ the calibration activations (on the CPU with `offload_activations`), whatever the depth of the model.
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedModel
from transformers.modeling_utils import remove_tied_weights_from_state_dict

from .api import PruneResult, _check_calibration, prune_blocks
from .arch import get_adapter
from .budget import Alignment, check_sparsity
from .checkpoint import METADATA_FILE, atomic_dir, record_fingerprint
from .errors import PruningError
from .methods import get_method

INDEX_FILE = "model.safetensors.index.json"
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _return_freed_blocks_to_the_os() -> None:
    """A fixed glibc mmap threshold: each freed block's tensors go back to the OS. By default glibc raises
    the threshold after the first large free, and later blocks land on a heap that does not shrink, so the
    resident size would grow block after block (measured: 1.8x the working set on 8 blocks)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class SafetensorsSource:
    """Tensors of a Hugging Face folder's safetensors files (one file or an index of shards), read on demand."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        single = self.folder / "model.safetensors"
        if not index.is_file() and not single.is_file():
            raise PruningError(f"{self.folder} has no safetensors weights (model.safetensors or {INDEX_FILE}): "
                               "convert the checkpoint to safetensors or prune it in memory")
        try:
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]
                self.files = {key: self.folder / name for key, name in weight_map.items()}
            else:
                with safe_open(single, "pt") as f:
                    self.files = dict.fromkeys(f.keys(), single)
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise PruningError(f"cannot read the safetensors index of {self.folder} ({err}): "
                               "is the checkpoint complete? re-download it") from None

    def __contains__(self, key: str) -> bool:
        return key in self.files

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise PruningError(f"checkpoint {self.folder} lacks tensor {missing[0]} (and {len(missing) - 1} more): "
                               "is it complete and of the architecture its config.json names?")
        by_file = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        tensors = {}
        # Each file is opened for this read only: its mapping, and the pages it touched, go with the block.
        for file, file_keys in by_file.items():
            try:
                with safe_open(file, "pt") as f:
                    for key in file_keys:
                        tensors[key] = f.get_tensor(key)
            except (OSError, SafetensorError) as err:
                raise PruningError(f"cannot read {file}: {err} (is the checkpoint complete? re-download it)") from None
        return tensors


class ShardWriter:
    """Output shards: one per block, plus one for the rest; the index `save_pretrained` writes for big models."""

    def __init__(self, folder: Path, num_blocks: int):
        self.folder, self.count = folder, num_blocks + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def file_name(self, shard: int) -> str:
        return f"model-{shard + 1:05d}-of-{self.count:05d}.safetensors"

    def write(self, shard: int, tensors: dict[str, torch.Tensor]) -> None:
        name = self.file_name(shard)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(tensors, self.folder / name, metadata={"format": "pt"})
        for key, tensor in tensors.items():
            if key not in self.weight_map:
                self.total_size += tensor.numel() * tensor.element_size()
            self.weight_map[key] = name

    def keys(self, shard: int) -> list[str]:
        name = self.file_name(shard)
        return [k for k, v in self.weight_map.items() if v == name]

    def write_index(self) -> None:
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class ShardedBlocks:
    """Blocks read from `source` when their turn comes and, once cut, written to `writer`'s shards."""

    def __init__(self, source: SafetensorsSource, writer: ShardWriter, prefix: str, device: torch.device,
                 dtype: torch.dtype):
        self.source, self.writer, self.prefix = source, writer, prefix
        self.device, self.dtype = device, dtype

    def load(self, index: int, layer: nn.Module) -> None:
        names = list(layer.state_dict())
        tensors = self.source.read([f"{self.prefix}.{index}.{name}" for name in names])
        for name in names:
            set_module_tensor_to_device(layer, name, self.device, value=tensors[f"{self.prefix}.{index}.{name}"],
                                        dtype=self.dtype)

    def release(self, index: int, layer: nn.Module, final: bool) -> None:
        if final:
            self.writer.write(index, {f"{self.prefix}.{index}.{k}": v for k, v in layer.state_dict().items()})
        for name in layer.state_dict():
            set_module_tensor_to_device(layer, name, "meta")


def prune_pretrained(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    method: str = "fasp",
    sparsity: float = 0.2,
    calibration: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 8,
    offload_activations: bool = False,
    round_to: int = 1,
    tp_multiple: int = 1,
    progress: bool = True,
    overwrite: bool = False,
    extra_metadata: dict | None = None,
    extra_files: Callable[[Path], None] | None = None,
    **method_options,
) -> PruneResult:
    """Prune the Hugging Face folder `source` into the checkpoint folder `out_dir`, one block in memory at a time.

    The same pruning as `prune(from_pretrained(source), ...)` followed by `save_pruned`, written atomically.
    `extra_metadata` joins pruning.json; `extra_files(folder)` adds files (e.g. the tokenizer) before the
    checkpoint is moved into place. The result's model has its blocks on the meta device.
    """
    sparsity = check_sparsity(sparsity)
    pruner = get_method(method, **method_options)
    calibration = _check_calibration(calibration)
    alignment = Alignment(round_to, tp_multiple)
    source = Path(source)
    config = AutoConfig.from_pretrained(source)
    adapter = get_adapter(config)
    weights = SafetensorsSource(source)
    device = torch.device(device)
    _return_freed_blocks_to_the_os()
    started = time.perf_counter()

    with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (source / "generation_config.json").is_file():
        skeleton.generation_config = GenerationConfig.from_pretrained(source)
    model = adapter.to_project(skeleton.eval())
    prefix = adapter.family.layers
    outside = [k for k in model.state_dict() if not k.startswith(prefix + ".")]
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    _load_tensors(model, weights, [k for k in outside if k in weights or k not in tied], dtype)
    model.tie_weights()

    with atomic_dir(out_dir, overwrite) as tmp:
        writer = ShardWriter(tmp, len(adapter.layers(model)))
        blocks = ShardedBlocks(weights, writer, prefix, device, dtype)
        result = prune_blocks(model, adapter, pruner, sparsity, calibration, blocks, batch_size=batch_size,
                              offload_activations=offload_activations, alignment=alignment, progress=progress,
                              started=started)
        _finish(result.model, writer, prefix)
        if extra_files is not None:
            extra_files(tmp)
        metadata = {**result.metadata, "fingerprint": record_fingerprint(tmp), **(extra_metadata or {})}
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    result.metadata = metadata
    return result


def _load_tensors(model: nn.Module, weights: SafetensorsSource, keys: list[str], dtype: torch.dtype) -> None:
    """Read `keys` into `model` on the CPU in `dtype`, one tensor at a time: a tensor read from a shard keeps that
    shard's mapping, and every page it touched, resident until the tensor goes (an embedding and an untied head
    of 151,936 x 1536 in float32 are 1.9 GB together)."""
    for key in keys:
        set_module_tensor_to_device(model, key, "cpu", value=weights.read([key])[key], dtype=dtype)


def _finish(model: PreTrainedModel, writer: ShardWriter, prefix: str) -> None:
    """Zero biases that finalize added to blocks already written, the rest of the weights, config, index."""
    for i, layer in enumerate(model.get_submodule(prefix)):
        expected = {f"{prefix}.{i}.{k}": v for k, v in layer.state_dict().items()}
        written = set(writer.keys(i))
        if set(expected) - written:
            tensors = load_file(writer.folder / writer.file_name(i))
            for key in set(expected) - written:  # a bias added, as zeros, so every block records one
                tensors[key] = torch.zeros(expected[key].shape, dtype=expected[key].dtype)
            writer.write(i, tensors)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(prefix + ".")}
    writer.write(writer.count - 1, remove_tied_weights_from_state_dict(rest, model))
    writer.write_index()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(writer.folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(writer.folder)
