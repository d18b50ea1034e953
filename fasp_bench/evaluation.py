"""Quality of one model: perplexity sets and zero-shot tasks, each a record in the results store.

The model is loaded only if some measurement is missing, so a rerun of a finished evaluation reads no
weights. Every measurement is keyed by the model's content fingerprint and its full protocol.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .data import C4_EVAL_WINDOWS, C4_SHARD, WIKITEXT2_TEST, bos_id, data_file, perplexity_dataset, perplexity_ids
from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import BenchError
from .models import fingerprint, load_config, load_model, resolve_model
from .perplexity import perplexity, ppl_windows
from .store import ResultsStore
from .zeroshot import BACKENDS, check_task_data, evaluate_tasks, hf_lm, task_source, unavailable_reason, vllm_lm


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
    backend: str = "hf"  # zero-shot through lm-eval's HFLM, or its vLLM model (BACKENDS)

    def check(self, data_root: Path | None) -> None:
        """Refuse bad settings and missing data files before any weights are read."""
        for name, value, least in (("--seqlen", self.seqlen, 2), ("--max-windows", self.max_windows, 1),
                                   ("--limit", self.limit, 1), ("--batch-size", self.batch_size, 1)):
            if value is not None and value < least:
                raise BenchError(f"{name} must be at least {least} (got {value})")
        resolve_dtype(self.dtype, resolve_device(self.device))
        if self.backend not in BACKENDS:
            raise BenchError(f"unknown --eval-backend {self.backend!r}: choose from {', '.join(BACKENDS)}")
        if self.backend == "vllm" and self.tasks:
            from .serving.bench import require_vllm

            require_vllm()
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

    engines: list = []

    def zeroshot_lm():
        """The lm-eval model, built once: around the loaded model, or a vLLM engine on the folder."""
        if not engines and protocol.backend == "vllm":
            loaded.clear()  # the engine loads its own copy of the weights
            engines.append(vllm_lm(str(resolve_model(spec)), dtype, protocol.seed, seqlen))
        elif not engines:
            engines.append(hf_lm(*model_and_tokenizer(), batch_size=protocol.batch_size * 2))
        return engines[0]

    rows = []
    for name in protocol.ppl:
        dataset, windows, windows_key = _windows_key(name, protocol, data_root, seqlen)
        key = {**windows_key, "dtype": dtype, "device": device.type}

        def run_ppl(name=name, dataset=dataset, windows=windows):
            model, tokenizer = model_and_tokenizer()
            ids = perplexity_ids(name, tokenizer, seqlen, data_root, protocol.seed)
            return perplexity(model, ids, seqlen, windows, protocol.batch_size, desc=f"{print_name} {dataset}",
                              bos=bos_id(tokenizer))

        record, cached = store.measure(fp, "perplexity", key, run_ppl, model=print_name,
                                       complete=lambda result: "window_nll" in result)
        rows.append(_row(record, cached, f"ppl {dataset}", record["result"]["ppl"],
                         f"{record['result']['windows']} x {seqlen} tokens"))

    keys, sources = {}, {}
    for task in protocol.tasks:
        reason = unavailable_reason(task, data_root, list(protocol.tasks_dirs))
        if reason:
            rows.append({"model": print_name, "measurement": f"zero-shot {task}", "value": None, "detail": reason,
                         "seconds": None, "status": "unavailable"})
            continue
        sources[task], digest = task_source(task, data_root, list(protocol.tasks_dirs))
        keys[task] = {"task": task, "source": sources[task], "yaml_sha256": digest, "limit": protocol.limit,
                      "num_fewshot": 0, "seed": protocol.seed, "dtype": dtype, "device": device.type,
                      **({"backend": protocol.backend} if protocol.backend != "hf" else {})}
    stored = {task: store.get(fp, "zeroshot", key) for task, key in keys.items()}
    missing = [task for task, record in stored.items() if record is None or "doc_margin" not in record["result"]]
    records = {task: (record, True) for task, record in stored.items() if task not in missing}
    run = partial(evaluate_tasks, data_root=data_root, limit=protocol.limit, seed=protocol.seed,
                  tasks_dirs=list(protocol.tasks_dirs))
    if len(missing) > 1:  # one lm-eval evaluation for every missing task of this model
        started = time.perf_counter()
        try:
            together = run(zeroshot_lm(), missing)
        except BenchError:
            pass  # one task at a time below, to tell which one fails
        else:
            share = round((time.perf_counter() - started) / len(missing), 3)  # the evaluation's wall time, per task
            for task in missing:
                records[task] = (store.add(fp, "zeroshot", keys[task], together[task], wall_s=share,
                                           model=print_name), False)
            missing = []
    for task in missing:
        try:
            records[task] = store.measure(fp, "zeroshot", keys[task],
                                          lambda task=task: run(zeroshot_lm(), [task])[task],
                                          model=print_name, complete=lambda result: "doc_margin" in result)
        except BenchError as err:
            if sources[task].startswith("yaml:"):
                raise  # a task file of the project's or the user's: its error is the user's to fix
            rows.append({"model": print_name, "measurement": f"zero-shot {task}", "value": None,
                         "detail": f"unavailable: {err}", "seconds": None, "status": "unavailable"})
    for task in [task for task in keys if task in records]:
        record, cached = records[task]
        result = record["result"]
        norm = f", acc_norm {result['acc_norm']:.4f}" if result.get("acc_norm") is not None else ""
        rows.append(_row(record, cached, f"zero-shot {task}", result["acc"],
                         f"acc over {result['docs']} of {result['docs_total']} docs{norm}"))
    if engines and protocol.backend == "vllm":  # stop the engine now, not at interpreter exit
        engines.pop().model.llm_engine.engine_core.shutdown()
    return rows


def _windows_key(name: str, protocol: EvalProtocol, data_root: Path | None, seqlen: int
                 ) -> tuple[str, int | None, dict]:
    """A perplexity set's stored name, its window count (None: all) and what names its windows in a record."""
    dataset = perplexity_dataset(name, data_root)
    cap = C4_EVAL_WINDOWS if dataset.startswith("c4") else None
    limits = [w for w in (cap, protocol.max_windows) if w is not None]
    windows = min(limits) if limits else None
    key = {"dataset": dataset, "seqlen": seqlen, "max_windows": windows,
           **({"seed": protocol.seed} if dataset == "c4-calval" else {})}
    return dataset, windows, key


def perplexity_windows(spec: str, protocol: EvalProtocol, data_root: Path | None) -> list[tuple[dict, list]]:
    """Every perplexity set's windows of token ids, exactly as `evaluate` scores them, with the key that names
    them (for scoring the same windows elsewhere: inside the serving engine)."""
    from transformers import AutoTokenizer

    protocol.check(data_root)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(spec))
    seqlen = protocol.seqlen or default_seqlen(load_config(spec))
    sets = []
    for name in protocol.ppl:
        _, windows, key = _windows_key(name, protocol, data_root, seqlen)
        ids = perplexity_ids(name, tokenizer, seqlen, data_root, protocol.seed)
        sets.append((key, ppl_windows(ids, seqlen, windows, bos_id(tokenizer)).tolist()))
    return sets


def _row(record: dict, cached: bool, measurement: str, value: float, detail: str) -> dict:
    return {"model": record.get("model"), "measurement": measurement, "value": value, "detail": detail,
            "seconds": record.get("wall_s"), "status": "cached" if cached else "measured"}
