"""One pruning job, the same for `fasp-bench prune` and `run`'s pruning stage: validated in one place,
streamed block by block from safetensors (in memory only for a checkpoint without safetensors), written
atomically with its calibration record and fingerprint in pruning.json."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

import pruning
from pruning.budget import Alignment, check_sparsity
from pruning.checkpoint import check_output_dir, save_pruned
from pruning.methods import get_method
from pruning.streaming import SafetensorsSource, prune_pretrained

from .data import C4_SHARD, calibration_ids, calibration_record, data_file
from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import BenchError
from .evaluation import default_seqlen
from .models import load_config, load_model, resolve_model


@dataclass(frozen=True)
class PruneJob:
    model: str
    method: str
    sparsity: float
    options: dict = field(default_factory=dict)  # method options, e.g. {"restore": False}
    nsamples: int = 128
    seqlen: int | None = None  # None: min(2048, model max)
    seed: int = 0
    batch_size: int = 8
    device: str | None = None  # None: cuda when present, else cpu
    dtype: str | None = None  # None: bfloat16 on a GPU or a CPU with native bf16, else float32
    offload_activations: bool = False
    round_to: int = 1  # every FFN width and V head width a multiple of this
    tp_multiple: int = 1  # KV-head counts and FFN widths a tensor-parallel size of this can split
    data_root: Path | None = None

    def check(self) -> PruneJob:
        """Everything cheap that can be wrong, refused before any weights are read; returns the job with its
        defaults (device, dtype, seqlen) filled in."""
        check_sparsity(self.sparsity)
        get_method(self.method, **self.options)
        Alignment(self.round_to, self.tp_multiple)
        for name, value in (("--nsamples", self.nsamples), ("--batch-size", self.batch_size)):
            if value < 1:
                raise BenchError(f"{name} must be at least 1 (got {value})")
        if self.seqlen is not None and self.seqlen < 2:
            raise BenchError(f"--seqlen must be at least 2 (got {self.seqlen})")
        if self.data_root is not None:
            data_file(self.data_root, C4_SHARD)
        config = load_config(self.model)
        pruning.get_adapter(config)
        device = resolve_device(self.device)
        return PruneJob(**{**self.__dict__, "device": str(device), "dtype": resolve_dtype(self.dtype, device),
                           "seqlen": self.seqlen or default_seqlen(config)})

    def key(self) -> dict:
        """The results-store identity of the checkpoint this job writes (a checked job: defaults filled in)."""
        return {"method": self.method, "options": get_method(self.method, **self.options).describe(),
                "sparsity": self.sparsity, "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed,
                "dtype": self.dtype, **Alignment(self.round_to, self.tp_multiple).describe()}

    def run(self, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
        """Prune into the checkpoint folder `out`; returns its pruning.json."""
        job = self.check()
        check_output_dir(out, overwrite)
        source = Path(_local_folder(job.model))
        tokenizer = AutoTokenizer.from_pretrained(source)
        ids = calibration_ids(tokenizer, job.nsamples, job.seqlen, job.seed, job.data_root)
        extra = {"source_model": job.model,
                 "calibration": calibration_record(tokenizer, job.nsamples, job.seqlen, job.seed, job.data_root)}
        dtype = DTYPES[job.dtype]
        common = dict(method=job.method, sparsity=job.sparsity, calibration=ids, batch_size=job.batch_size,
                      device=job.device, offload_activations=job.offload_activations, round_to=job.round_to,
                      tp_multiple=job.tp_multiple, progress=progress, **job.options)
        try:
            SafetensorsSource(source)
        except pruning.PruningError as err:
            warnings.warn(f"{err}; pruning with the whole model in memory", stacklevel=2)
            model, _ = load_model(job.model, dtype)
            result = pruning.prune(model, **common)
            metadata = {**result.metadata, **extra}
            save_pruned(result.model, out, metadata, tokenizer=tokenizer, overwrite=overwrite)
            return pruning.read_metadata(out)
        result = prune_pretrained(source, out, dtype=dtype, overwrite=overwrite, extra_metadata=extra,
                                  extra_files=tokenizer.save_pretrained, **common)
        return result.metadata


def _local_folder(spec: str) -> str:
    """The model's folder on this machine: a hub id is downloaded (config, tokenizer, safetensors) first."""
    path = resolve_model(spec)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as err:  # the hub client raises many types; the user needs one line
        raise BenchError(f"cannot download {spec} from the hub ({type(err).__name__}): check the id and the "
                         "network, or give a local folder") from None


def prune_summary(metadata: dict, out: str | Path) -> str:
    m = metadata
    return (f"{m['method']} sparsity {m['sparsity_requested']:.3f} -> realised {m['sparsity_realised']:.4f} "
            f"of prunable, {m['model_sparsity_realised']:.4f} of all parameters "
            f"({m['total_params']['before']:,} -> {m['total_params']['after']:,}); {m['device']}, {m['dtype']}; "
            f"{m['prune_seconds']:.1f} s; saved {out}")

