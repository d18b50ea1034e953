"""`fasp-bench prune|eval|serve|run|report|study|prune-speed`: one-line errors, non-zero exits, progress bars."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

import pruning
from pruning.checkpoint import check_output_dir, read_metadata
from pruning.methods import parse_method_spec

from . import __version__, benchmarks
from .data import DATA_ENV, data_dir
from .devices import DTYPES, resolve_device, resolve_dtype
from .errors import BenchError
from .evaluation import EvalProtocol, evaluate
from .executor import EXECUTORS
from .models import DEFAULT_MODEL, fingerprint
from .prune_job import PruneJob, prune_summary
from .report import SWEEP_NOTE, human_sweep, sweep_table, write_report
from .run import PROFILES, SWEEP, RunPlan, run
from .serving.bench import (
    ENGINES,
    ServeProtocol,
    default_dtype,
    require_vllm,
    serve_models,
    serving_table,
    sweep_points,
)
from .store import STORE_FILE, ResultsStore
from .study import load_study, study_tables, summary_table
from .zeroshot import ALL_TASKS, BACKENDS, resolve_tasks

REMEASURE_HELP = ("measure every serving point again even where the store holds it (when other work disturbed the "
                  "machine): the new records supersede the old; leave it off to resume a run")


def _method_options(args, method: str) -> dict:
    """Method-specific flags -> options of that method (a flag given to another method is refused)."""
    given = {"--no-restore": ("fasp", "restore", False) if args.no_restore else None,
             "--damping": ("fasp", "damping", args.damping) if args.damping is not None else None,
             "--damping-toward": ("fasp", "damping_toward", args.damping_toward) if args.damping_toward else None,
             "--structure": ("flap", "structure", args.structure) if args.structure else None,
             "--no-compensate": ("flap", "compensate", False) if args.no_compensate else None}
    options = {}
    for flag, spec in given.items():
        if spec is None:
            continue
        owner, key, value = spec
        if method != owner:
            raise BenchError(f"{flag} applies to --method {owner}, not {method}")
        options[key] = value
    return options


def _prune_job(args) -> PruneJob:
    method, options = parse_method_spec(args.method)  # `--method fasp:restore=false` is `--method fasp --no-restore`
    return PruneJob(model=args.model, method=method, sparsity=args.sparsity,
                    options={**options, **_method_options(args, method)},
                    nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
                    device=args.device, dtype=args.dtype, offload_activations=args.offload_activations,
                    round_to=args.round_to, tp_multiple=args.tp_multiple, data_root=data_dir(args.data))


def cmd_prune(args) -> int:
    job = _prune_job(args).check()  # everything cheap before any weights are read
    check_output_dir(args.out, args.overwrite)
    print(prune_summary(job.run(args.out, args.overwrite), args.out))
    return 0


def cmd_widen_v(args) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pruning.checkpoint import save_pruned

    from .models import load_config, resolve_model
    from .serving.padding import widen_v

    path = resolve_model(args.checkpoint)
    config = load_config(args.checkpoint)
    head_dim = pruning.get_adapter(config).head_dim
    if not any(dv < head_dim for dv in getattr(config, "v_head_dims", None) or []):
        raise BenchError(f"{args.checkpoint} has no V head narrower than the head size ({head_dim}): nothing to widen "
                         "(give a checkpoint pruned by fasp or fasp-plus)")
    check_output_dir(args.out, args.overwrite)
    model = widen_v(AutoModelForCausalLM.from_pretrained(path, dtype="auto"))
    metadata = {**(read_metadata(path) or {}), "v_widened_from": str(path)}
    metadata.pop("fingerprint", None)  # a new checkpoint: fingerprinted when written
    save_pruned(model, args.out, metadata, tokenizer=AutoTokenizer.from_pretrained(path), overwrite=args.overwrite)
    print(f"{args.out}: {type(model).__name__}, V widened to {head_dim} in every layer (same outputs)")
    return 0


def cmd_recover(args) -> int:
    from .recovery import RecoveryPlan, parse_tokens, recover

    plan = RecoveryPlan(tokens=parse_tokens(args.tokens), source=args.source,
                        seqlen=args.seqlen, batch_size=args.batch_size, micro_batch=args.micro_batch,
                        learning_rate=args.lr, temperature=args.temperature, lm_weight=args.lm_weight,
                        lora_rank=args.lora_rank, epochs=args.epochs, validation_seqlen=args.validation_seqlen,
                        seed=args.seed, save_steps=args.save_steps, device=args.device, dtype=args.dtype).check()
    record = recover(args.checkpoint, args.teacher, plan, args.out, data_root=data_dir(args.data),
                     overwrite=args.overwrite)
    first, last = record["loss"][0][1], record["loss"][-1][1]
    print(f"{args.out}: distilled from {args.teacher} on {record['tokens']:,} {plan.source} tokens "
          f"({record['steps']} steps, {record['passes']} pass(es) over {record['source_tokens']:,}), "
          f"loss {first:.4f} -> {last:.4f}, {record['seconds']:.0f} s")
    return 0


def cmd_eval(args) -> int:
    root = data_dir(args.data)
    tasks_dirs = tuple(Path(d) for d in args.tasks_dir)
    protocol = EvalProtocol(ppl=_ppl_sets(args.ppl),
                            tasks=tuple(resolve_tasks(args.zeroshot, list(tasks_dirs))), seqlen=args.seqlen,
                            max_windows=args.max_windows, limit=args.limit, seed=args.seed, dtype=args.dtype,
                            device=args.device, batch_size=args.batch_size, tasks_dirs=tasks_dirs,
                            backend=args.eval_backend)
    store = ResultsStore(Path(args.run_dir) / STORE_FILE)
    rows = evaluate(args.checkpoint, store, protocol, root)
    table = pd.DataFrame(rows).drop(columns="model")
    print(table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}"))
    print(f"results: {store.path}")
    return 0


def _ppl_sets(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")


def cmd_serve(args) -> int:
    require_vllm()
    protocol = ServeProtocol(prompts=args.prompts, input_len=args.input_len, output_len=args.output_len,
                             repeats=args.repeats, dtype=args.dtype or default_dtype(),
                             kv_cache_gib=args.kv_cache_gib, seed=args.seed,
                             tensor_parallel_size=args.tensor_parallel_size, engine=args.engine)
    protocol.check()
    protocol = protocol.resolved()
    dense = args.dense or _source_model(args.checkpoints)
    specs = ([dense] if dense and dense not in args.checkpoints else []) + list(args.checkpoints)
    store = ResultsStore(Path(args.run_dir) / STORE_FILE)
    sweep = _sweep_arg(args.sweep) or ()
    with tqdm(total=len(specs), desc="serving", unit="model") as bar:
        rows = serve_models(specs, store, protocol, timeout_s=args.timeout, progress=bar, sweep=sweep,
                            remeasure=args.remeasure)
    print(serving_table(rows).to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.3f}"))
    if sweep:
        models = [{"label": spec, "fingerprint": fingerprint(spec), "method": None if i == 0 else "pruned"}
                  for i, spec in enumerate(specs)]
        points = [asdict(p) for p in sweep_points(protocol, sweep)]
        print("\n" + human_sweep(sweep_table(store.records(), models, points)).to_string(
            index=False, na_rep="-", float_format=lambda v: f"{v:.1f}"))
        print(SWEEP_NOTE)
    print(f"{protocol.prompts} prompts x ({protocol.input_len} in, {protocol.output_len} out), {protocol.dtype}, "
          f"median of {protocol.repeats}; KV budget {protocol.kv_cache_gib} GiB; engine {protocol.engine}; "
          f"results: {store.path}")
    return 0 if all("error" not in r for r in rows) else 1


def _sweep_arg(values: list[str] | None) -> tuple[tuple[int, int, int], ...] | None:
    """--sweep: None when not given, the default sweep when given bare, else the points named."""
    return None if values is None else tuple(map(_sweep_point, values)) or SWEEP


def _sweep_point(text: str) -> tuple[int, int, int]:
    try:
        point = tuple(int(v) for v in text.lower().split("x"))
        if len(point) != 3 or min(point) < 1:
            raise ValueError
    except ValueError:
        raise BenchError(f"--sweep point {text!r} is not BATCHxINxOUT with each at least 1 (e.g. 8x64x256: 8 prompts "
                         "of 64 tokens, 256 generated each)") from None
    return point


def _source_model(checkpoints: list[str]) -> str | None:
    """The dense model the checkpoints were pruned from, when they all name the same one."""
    sources = set()
    for checkpoint in checkpoints:
        try:
            sources.add((read_metadata(checkpoint) or {}).get("source_model"))
        except (OSError, ValueError):
            sources.add(None)
    return sources.pop() if len(sources) == 1 else None


def cmd_run(args) -> int:
    plan = RunPlan(model=args.model, methods=args.methods, sparsities=args.sparsities, profile=args.profile,
                   out=Path(args.out), work_dir=Path(args.work_dir), data_root=data_dir(args.data), seed=args.seed,
                   serve=not args.no_serve, dtype=args.dtype, device=args.device, round_to=args.round_to,
                   tp_multiple=args.tp_multiple, tensor_parallel_size=args.tensor_parallel_size,
                   nsamples=args.nsamples, ppl=None if args.ppl is None else _ppl_sets(args.ppl),
                   tasks=None if args.zeroshot is None else tuple(resolve_tasks(args.zeroshot)), limit=args.limit,
                   max_windows=args.max_windows, eval_backend=args.eval_backend, sweep=_sweep_arg(args.sweep),
                   executor=args.executor, ray_address=args.ray_address, task_cpus=args.task_cpus,
                   recover=tuple(args.recover), remeasure_serving=args.remeasure_serving)
    readme = run(plan, command=" ".join(["python scripts/compare.py" if args.script else "fasp-bench run",
                                          *(args.argv or [])]))
    print(f"report: {readme}")
    return 0


def cmd_report(args) -> int:
    if not Path(args.results).is_file():
        raise BenchError(f"results file {args.results} does not exist: give the results.jsonl of a fasp-bench run")
    print(f"report: {write_report(args.results, args.out)}")
    return 0


def cmd_study(args) -> int:
    table, items = load_study(args.results, args.limit)
    text = summary_table(table, args.tasks) if args.summary else study_tables(table, items, args.against, args.tasks)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"study: {args.out}")
    else:
        print(text)
    return 0


def cmd_prune_speed(args) -> int:
    print(benchmarks.prune_speed(_prune_job(args)))
    return 0


def cmd_gemm_widths(args) -> int:
    device = resolve_device(args.device)
    print(benchmarks.gemm_widths(args.hidden, args.width, args.tokens, resolve_dtype(args.dtype, device), str(device)))
    return 0


def cmd_prune_memory(args) -> int:
    print(benchmarks.prune_memory(args.method, work_dir=args.work_dir))
    return 0


def _add_model_args(p: argparse.ArgumentParser, calibration: bool = True) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"Hugging Face folder, hub id, or embedded name (default {DEFAULT_MODEL})")
    _add_device_args(p)
    p.add_argument("--data", help=f"offline data folder (default: ${DATA_ENV}; unset: the hub)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--offload-activations", action="store_true",
                   help="keep calibration activations on the CPU between blocks (when they do not fit on the GPU)")
    if calibration:
        p.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
        p.add_argument("--seqlen", type=int, help="calibration window length (default min(2048, model max))")
        p.add_argument("--seed", type=int, default=0)


def _add_alignment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--round-to", type=int, default=1,
                   help="keep every FFN width and V head width a multiple of N (GEMM tiles; see README)")
    p.add_argument("--tp-multiple", type=int, default=1,
                   help="keep KV-head counts and FFN widths splittable by tensor parallelism of size K")


def _add_eval_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-backend", choices=BACKENDS, default="hf",
                   help="zero-shot through lm-eval's transformers model (hf, default) or its vLLM model (vllm: the "
                        "fast path on a GPU; the checkpoint is served as in the serving stage)")


def _add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="vLLM tensor parallelism (prune with --tp-multiple of it so every layer splits)")


def _add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=sorted(DTYPES),
                   help="default: bfloat16 on a GPU or a CPU with native bf16, else float32")


def _add_method_args(p: argparse.ArgumentParser, sparsity_required: bool) -> None:
    p.add_argument("--method", default="fasp",
                   help=f"one of {', '.join(sorted(pruning.METHODS))} (default fasp), with options as in run: "
                        "fasp:restore=false")
    p.add_argument("--sparsity", type=float, required=sparsity_required, default=None if sparsity_required else 0.2,
                   help="fraction of prunable (attention + MLP) parameters to remove, in [0, 1)")
    p.add_argument("--no-restore", action="store_true", help="FASP without least-squares restoration (ablation)")
    p.add_argument("--damping", type=float, help="FASP restoration damping, a fraction of mean diag(G) (default 0.1)")
    p.add_argument("--damping-toward", help="FASP restoration damps toward the 'original' weights (default) or 'zero'")
    p.add_argument("--structure", help="FLAP structure: AL-AM (adaptive, default) or UL-UM (uniform)")
    p.add_argument("--no-compensate", action="store_true", help="FLAP without bias compensation (ablation)")
    _add_alignment_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fasp-bench", description=__doc__)
    parser.add_argument("--version", action="version", version=f"fasp-bench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save a smaller Hugging Face checkpoint")
    _add_model_args(p)
    _add_method_args(p, sparsity_required=True)
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("recover", help="distil the dense model into a pruned checkpoint (recovery training)")
    p.add_argument("checkpoint", help="pruned checkpoint folder (the student)")
    p.add_argument("--teacher", required=True, help="the dense model it was pruned from (folder, hub id or "
                                                     "embedded name)")
    p.add_argument("--tokens", required=True, help="training tokens, or 'all' (every token of the c4 source)")
    p.add_argument("--source", default="c4", help="c4 (calibration-side C4 less c4-calval, default) or teacher "
                                                   "(text the teacher samples in vLLM)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--seqlen", type=int, default=512, help="training window length (default 512)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (default 8)")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward (default 4)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate, cosine decay (default 5e-5)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature (default 1)")
    p.add_argument("--lm-weight", type=float, default=0.0,
                   help="weight of the plain next-token loss beside the KL term (default 0)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA rank, merged into the weights (default 0: full "
                                                            "fine-tuning)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the source a budget may take (default 1)")
    p.add_argument("--validation-seqlen", type=int, default=512,
                   help="window length of the c4-calval set kept out of training (default 512)")
    p.add_argument("--save-steps", type=int, default=20, help="resumable checkpoint every N steps (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help=f"offline data folder (default: ${DATA_ENV}; unset: the hub)")
    _add_device_args(p)
    p.set_defaults(run=cmd_recover)

    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a checkpoint or model, into the store")
    p.add_argument("checkpoint", help="pruned checkpoint folder, Hugging Face folder, hub id or embedded name")
    p.add_argument("--ppl", default="wikitext2,c4",
                   help="comma-separated perplexity sets: wikitext2, c4 (offline: c4-heldout), c4-calval "
                        "(calibration-side, for choosing settings), or none")
    p.add_argument("--zeroshot", default="none",
                   help=f"comma-separated lm-eval tasks, 'all' ({', '.join(ALL_TASKS)}) or none (default)")
    p.add_argument("--tasks-dir", action="append", default=[],
                   help="extra folder of lm-eval task YAMLs (repeatable; ${FASP_BENCH_DATA} is filled in)")
    p.add_argument("--seqlen", type=int, help="perplexity window length (default min(2048, model max))")
    p.add_argument("--max-windows", type=int, help="score only the first N windows of each set (quick profile)")
    p.add_argument("--limit", type=int, help="score only the first N documents of each task (quick profile)")
    p.add_argument("--seed", type=int, default=0)
    _add_device_args(p)
    p.add_argument("--data", help=f"offline data folder (default: ${DATA_ENV})")
    p.add_argument("--batch-size", type=int, default=4)
    _add_eval_backend_arg(p)
    p.add_argument("--run-dir", default="runs", help="folder of the results store results.jsonl (default runs/)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("serve", help="serve checkpoints with vLLM (one process each) and compare with the dense model")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders (and/or models)")
    p.add_argument("--dense", help="the dense baseline (default: source_model in the checkpoints' pruning.json)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per model; the median is reported")
    p.add_argument("--sweep", nargs="*", metavar="BATCHxINxOUT",
                   help="also measure these load regimes (default: decode-bound 64 in, 256 out at batch 1, 8, 32; "
                        "prefill-bound 8 x 1024 in, 1 out) with the speed-up's limit and share, one engine per model")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="default: float32 on CPUs without native bf16, bfloat16 otherwise")
    p.add_argument("--kv-cache-gib", type=int, default=1,
                   help="fixed KV-cache budget per rank (whole GiB, default 1): VLLM_CPU_KVCACHE_SPACE on a CPU, "
                        "vLLM's kv_cache_memory_bytes on a GPU")
    _add_tp_arg(p)
    p.add_argument("--engine", choices=ENGINES,
                   help="where vLLM's engine runs: separate processes (vLLM's layout; default on a GPU or with tensor "
                        "parallelism) or in-process (default on a CPU: every core on the model, fast start)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds before a model's process is killed")
    p.add_argument("--run-dir", default="runs", help="folder of the results store results.jsonl (default runs/)")
    p.add_argument("--remeasure", action="store_true", help=REMEASURE_HELP)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("run", help="the whole comparison: prune, evaluate, serve, report (scripts/compare.py)")
    p.add_argument("--methods", nargs="+", default=["fasp", "flap", "wanda-sp"],
                   help="methods, each with options if any: fasp fasp:restore=false flap:structure=UL-UM wanda-sp")
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.1, 0.2, 0.3])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--profile", default="quick", help=f"one of {', '.join(PROFILES)} (default quick)")
    p.add_argument("--out", default="reports", help="report folder (default reports/)")
    p.add_argument("--work-dir", default="runs", help="checkpoints and the results store (default runs/)")
    p.add_argument("--data", help=f"offline data folder (default: ${DATA_ENV})")
    p.add_argument("--seed", type=int, default=0)
    _add_device_args(p)
    _add_alignment_args(p)
    _add_tp_arg(p)
    p.add_argument("--no-serve", action="store_true", help="skip the vLLM stage")
    p.add_argument("--remeasure-serving", action="store_true", help=REMEASURE_HELP)
    p.add_argument("--nsamples", type=int, help="calibration windows instead of the profile's (use a --work-dir "
                                                 "per count: checkpoint folders are named by method and sparsity)")
    p.add_argument("--ppl", help="comma-separated perplexity sets instead of the profile's: wikitext2, c4, c4-calval "
                                 "(calibration-side, for choosing settings), or none")
    p.add_argument("--zeroshot", help="comma-separated lm-eval tasks instead of the profile's, 'all' or none")
    p.add_argument("--limit", type=int, help="zero-shot documents per task instead of the profile's (the first N)")
    p.add_argument("--max-windows", type=int, help="perplexity windows per set instead of the profile's (the first N)")
    p.add_argument("--sweep", nargs="*", metavar="BATCHxINxOUT",
                   help="serving load regimes instead of the profile's (bare: the default sweep of `serve --sweep`)")
    _add_eval_backend_arg(p)
    p.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: every stage in this process, one after another (default); ray: every prune, "
                        "evaluation and serving measurement a Ray task (pip install 'fasp-bench[ray]')")
    p.add_argument("--recover", action="append", default=[], metavar="kd:tokens=N[,N...][,OPTION=V...]",
                   help="distil each pruned model from the dense one per budget (0: the one-shot model; all: every "
                        "calibration-side token); options source=c4|teacher, lora=R, lr, temperature, lm_weight, "
                        "epochs, seqlen, batch_size, micro_batch (see fasp-bench recover)")
    p.add_argument("--ray-address", help="the Ray cluster to join (default: start a local Ray instance)")
    p.add_argument("--task-cpus", type=float, default=1.0,
                   help="CPUs each Ray task asks for when the run uses no GPU (default 1)")
    p.set_defaults(run=cmd_run)

    p = sub.add_parser("report", help="rebuild the report from a results file")
    p.add_argument("--results", default="runs/results.jsonl")
    p.add_argument("--out", default="reports")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("study", help="method-development tables: every configuration in the stores against "
                                     "baselines (ablations, calibration-size sweeps)")
    p.add_argument("results", nargs="+", help="results.jsonl files, each optionally tagged: "
                                                         "runs/calib16/results.jsonl=16")
    p.add_argument("--against", nargs="+", default=["fasp", "flap", "wanda-sp"],
                   help="baseline methods (specs as in run --methods) each row is paired with")
    p.add_argument("--tasks", nargs="+", help="zero-shot tasks the mean accuracy and its differences cover "
                                              "(default: every task in the results)")
    p.add_argument("--limit", type=int, help="zero-shot records scored on the first N documents per task "
                                             "(default: the latest run's count)")
    p.add_argument("--summary", action="store_true",
                   help="one table across the stores (one per model): perplexities, zero-shot mean, realised "
                        "sparsity, prune seconds and the vLLM speed-up of every configuration")
    p.add_argument("--out", help="write the markdown here instead of printing it")
    p.set_defaults(run=cmd_study)

    p = sub.add_parser("widen-v", help="the same checkpoint with narrow V zero-padded to the head size in the "
                                       "weights (serve both to measure what the engine's V padding costs)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=cmd_widen_v)

    p = sub.add_parser("prune-speed", help="benchmark: prune time / one dense forward over the calibration tokens")
    _add_model_args(p)
    _add_method_args(p, sparsity_required=False)
    p.set_defaults(run=cmd_prune_speed)

    p = sub.add_parser("prune-memory", help="benchmark: peak host RSS streaming-pruning a 16-layer random-init "
                                            "Llama / its 8-layer twin (target <= 1.1)")
    p.add_argument("--method", default="fasp", choices=sorted(pruning.METHODS))
    p.add_argument("--work-dir", help="where the two random-init checkpoints go (about 12 GB; default: the temp dir)")
    p.set_defaults(run=cmd_prune_memory)

    p = sub.add_parser("gemm-widths", help="benchmark: FFN matmul throughput at a width vs that width aligned to N")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--width", type=int, default=5461, help="an unaligned pruned FFN width (default: 2/3 of 8192)")
    p.add_argument("--tokens", type=int, default=512)
    _add_device_args(p)
    p.set_defaults(run=cmd_gemm_widths)
    return parser


def main(argv: list[str] | None = None, script: bool = False) -> int:
    args = build_parser().parse_args(argv)
    args.script, args.argv = script, (argv if argv is not None else sys.argv[1:])[1:]
    warnings.formatwarning = lambda message, *_, **__: f"fasp-bench: warning: {message}\n"
    try:
        return args.run(args)
    except (BenchError, pruning.PruningError) as err:
        print(f"fasp-bench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fasp-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
