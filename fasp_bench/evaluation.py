"""Quality of one model: perplexity sets and zero-shot tasks, each a record in the results store.

The model is loaded only if some measurement is missing, so a rerun of a finished evaluation reads no
weights. Every measurement is keyed by the model's content fingerprint and its full protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data import C4_EVAL_WINDOWS, C4_SHARD, WIKITEXT2_TEST, bos_id, data_file, perplexity_dataset, perplexity_ids
from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import BenchError
from .models import fingerprint, load_config, load_model
from .perplexity import perplexity
from .store import ResultsStore
from .zeroshot import check_task_data, evaluate_task, task_source, unavailable_reason


@dataclass(frozen=True)
class EvalProtocol:
    ppl: tuple[str, ...] = ("wikitext2", "c4")
    tasks: tuple[str, ...] = ()
    seqlen: int | None = None  # default: min(2048, model max)
    max_windows: int | None = None  # quick profile: the first N windows of each set
    limit: int | None = None  # quick profile: the first N documents of each task
    seed: int = 0
    dtype: str | None = None  # None: the device's default (bfloat16 on a GPU or a CPU with native bf16)
    device: str | None = None  # None: cuda when present, else cpu
    batch_size: int = 4
    tasks_dirs: tuple[Path, ...] = field(default_factory=tuple)

    def check(self, data_root: Path | None) -> None:
        """Refuse bad settings and missing data files before any weights are read."""
        for name, value, least in (("--seqlen", self.seqlen, 2), ("--max-windows", self.max_windows, 1),
                                   ("--limit", self.limit, 1), ("--batch-size", self.batch_size, 1)):
            if value is not None and value < least:
                raise BenchError(f"{name} must be at least {least} (got {value})")
        resolve_dtype(self.dtype, resolve_device(self.device))
        for name in self.ppl:
            perplexity_dataset(name, data_root)
            if data_root is not None:
                data_file(data_root, WIKITEXT2_TEST if name == "wikitext2" else C4_SHARD)
        check_task_data(list(self.tasks), data_root, list(self.tasks_dirs))


def default_seqlen(config) -> int:
    return min(2048, getattr(config, "max_position_embeddings", None) or 2048)


def evaluate(spec: str, store: ResultsStore, protocol: EvalProtocol, data_root: Path | None,
             model_name: str | None = None) -> list[dict]:
    """Measure what is missing for `spec`; one row per measurement (status measured/cached/unavailable)."""
    protocol.check(data_root)
    device = resolve_device(protocol.device)
    dtype = resolve_dtype(protocol.dtype, device)
    seqlen = protocol.seqlen or default_seqlen(load_config(spec))
    print_name = model_name or spec
    fp = fingerprint(spec)
    loaded: list = []

    def model_and_tokenizer():
        if not loaded:
            loaded.extend(load_model(spec, DTYPES[dtype], check_supported=False, device=device))
        return loaded

    rows = []
    for name in protocol.ppl:
        dataset = perplexity_dataset(name, data_root)
        cap = C4_EVAL_WINDOWS if dataset.startswith("c4") else None
        limits = [w for w in (cap, protocol.max_windows) if w is not None]
        windows = min(limits) if limits else None
        key = {"dataset": dataset, "seqlen": seqlen, "max_windows": windows, "dtype": dtype,
               "device": device.type, **({"seed": protocol.seed} if dataset == "c4-calval" else {})}

        def run_ppl(name=name, dataset=dataset, windows=windows):
            model, tokenizer = model_and_tokenizer()
            ids = perplexity_ids(name, tokenizer, seqlen, data_root, protocol.seed)
            return perplexity(model, ids, seqlen, windows, protocol.batch_size, desc=f"{print_name} {dataset}",
                              bos=bos_id(tokenizer))

        record, cached = store.measure(fp, "perplexity", key, run_ppl, model=print_name,
                                       complete=lambda result: "window_nll" in result)
        rows.append(_row(record, cached, f"ppl {dataset}", record["result"]["ppl"],
                         f"{record['result']['windows']} x {seqlen} tokens"))

    for task in protocol.tasks:
        reason = unavailable_reason(task, data_root, list(protocol.tasks_dirs))
        if reason:
            rows.append({"model": print_name, "measurement": f"zero-shot {task}", "value": None, "detail": reason,
                         "seconds": None, "status": "unavailable"})
            continue
        source, digest = task_source(task, data_root, list(protocol.tasks_dirs))
        key = {"task": task, "source": source, "yaml_sha256": digest, "limit": protocol.limit, "num_fewshot": 0,
               "seed": protocol.seed, "dtype": dtype, "device": device.type}

        def run_task(task=task):
            model, tokenizer = model_and_tokenizer()
            return evaluate_task(model, tokenizer, task, data_root, protocol.limit, protocol.batch_size * 2,
                                 protocol.seed, list(protocol.tasks_dirs))

        try:
            record, cached = store.measure(fp, "zeroshot", key, run_task, model=print_name,
                                           complete=lambda result: "doc_acc" in result)
        except BenchError as err:
            if source.startswith("yaml:"):
                raise
            rows.append({"model": print_name, "measurement": f"zero-shot {task}", "value": None,
                         "detail": f"unavailable: {err}", "seconds": None, "status": "unavailable"})
            continue
        result = record["result"]
        norm = f", acc_norm {result['acc_norm']:.4f}" if result.get("acc_norm") is not None else ""
        rows.append(_row(record, cached, f"zero-shot {task}", result["acc"],
                         f"acc over {result['docs']} of {result['docs_total']} docs{norm}"))
    return rows


def _row(record: dict, cached: bool, measurement: str, value: float, detail: str) -> dict:
    return {"model": record.get("model"), "measurement": measurement, "value": value, "detail": detail,
            "seconds": record.get("wall_s"), "status": "cached" if cached else "measured"}
