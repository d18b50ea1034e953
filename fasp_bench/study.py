"""Method-development tables: every configuration a store holds, each against chosen baselines.

`fasp-bench report` pages one run; a study (an ablation, a calibration-size sweep) is many runs, often in
several stores (one `--work-dir` per calibration size). This merges the models of every run record of each
store, tags each store's rows (`runs/calib16/results.jsonl=16`), and writes one table per metric: the value
with its interval and the paired difference against each baseline method at the same sparsity and tag.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from . import stats
from .errors import BenchError
from .report import (
    DATASET_NAMES,
    TASK_NAMES,
    ZEROSHOT_STATISTICS,
    Items,
    _acc_text,
    _interval_text,
    _margin_text,
    _ppl_text,
    _quality_metrics,
    _speedup_text,
    _task_mean,
    _tasks,
    difference,
    model_table,
)
from .store import ResultsStore


def merged_run(records: list[dict]) -> dict:
    """A run record naming every model of every run in `records` (a label's latest fingerprint wins), matching
    the protocols of the latest run."""
    runs = [r["result"] for r in records if r["metric"] == "run"]
    if not runs:
        raise BenchError("the results file has no run record: produce it with `fasp-bench run`")
    models = {}
    for run in runs:
        for model in run["models"]:
            models[model["label"]] = model
    return {**runs[-1], "models": list(models.values())}


def load_study(stores: list[str], limit: int | None = None) -> tuple[pd.DataFrame, dict[tuple[str, str], Items]]:
    """Rows of every model in every store (`PATH` or `PATH=TAG`), with a `tag` column; per-item data keyed by
    (tag, label). `limit`: the zero-shot records scored on that many documents per task (default: the latest
    run's count)."""
    tables, items = [], {}
    for spec in stores:
        path, _, tag = spec.partition("=")
        if not Path(path).is_file():
            raise BenchError(f"results file {path} does not exist: give the results.jsonl of a fasp-bench run")
        records = ResultsStore(path).records()
        run = merged_run(records)
        if limit is not None:
            run["zeroshot_match"] = {**run["zeroshot_match"], "limit": limit}
        table, store_items = model_table(records, {"result": run})
        table.insert(0, "tag", tag or Path(path).parent.name)
        tables.append(table)
        items.update({(table["tag"].iloc[0], label): item for label, item in store_items.items()})
    return pd.concat(tables, ignore_index=True), items


def _restrict_tasks(table: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """The table with its mean accuracy (and standard error) over `tasks` only."""
    unknown = sorted(set(tasks) - set(_tasks(table)))
    if unknown:
        raise BenchError(f"no zero-shot results for task(s) {', '.join(unknown)}: the results hold "
                         f"{', '.join(_tasks(table)) or 'none'}")
    table = table.drop(columns=[c for c in table.columns if c.startswith(("acc ", "margin "))
                                and c.split()[1] != "mean" and c.split()[1] not in tasks])
    table["acc mean"] = table[[f"acc {t}" for t in tasks]].mean(axis=1, skipna=False)
    se = table[[f"acc {t} se" for t in tasks]] if all(f"acc {t} se" in table for t in tasks) else None
    table["acc mean se"] = (None if se is None else [stats.task_mean_stderr(list(r)) if r.notna().all() else None
                                                     for _, r in se.iterrows()])
    if "margin mean" in table:
        margins = [dict(r) for _, r in table.iterrows()]
        for row in margins:
            _task_mean(row, "margin", tasks)
        table["margin mean"] = [r["margin mean"] for r in margins]
        table["margin mean se"] = [r["margin mean se"] for r in margins]
    return table


def _task_table(table: pd.DataFrame) -> str:
    """Every configuration's accuracy per task (dense first), to see which task moves a mean."""
    tasks = _tasks(table)
    rows = [[row["tag"], f"{row['sparsity']:.0%}", row["method"], *(_acc_text(row, f"acc {t}") for t in tasks)]
            for _, row in table.dropna(subset=["acc mean"]).sort_values(["tag", "sparsity"], kind="stable").iterrows()]
    columns = ["tag", "sparsity", "configuration", *(TASK_NAMES.get(t, t) for t in tasks)]
    frame = pd.DataFrame(rows, columns=columns)
    frame = frame.drop(columns="tag") if table["tag"].nunique() == 1 else frame
    return frame.to_markdown(index=False, disable_numparse=True)


def study_tables(table: pd.DataFrame, items: dict[tuple[str, str], Items], baselines: list[str],
                 tasks: list[str] | None = None) -> str:
    """Markdown: per metric, one row per (tag, sparsity, configuration) with its value and the paired
    difference against each baseline (`*`: the 95% interval excludes zero); then accuracy per task. `tasks`
    restricts the zero-shot mean (and its paired differences) to those tasks."""
    table = _restrict_tasks(table, tasks) if tasks else table
    tagged = table["tag"].nunique() > 1
    sections = []
    over = ", ".join(TASK_NAMES.get(t, t) for t in _tasks(table))
    for metric in _quality_metrics(table):
        ppl = metric.startswith("ppl ")
        dense = table[(table["method"] == "dense") & table[metric].notna()]
        if ppl:
            name, unit, fmt, scale, value = DATASET_NAMES.get(metric[4:], metric[4:]), "Δ log-ppl", "+.3f", 1, _ppl_text
        else:
            name, unit, fmt, scale = ZEROSHOT_STATISTICS[metric]
            acc = metric == "acc mean"
            name, value = f"{name}{' (%)' if acc else ''} over {over}", _acc_text if acc else _margin_text
        header = f"### {name}"
        if len(dense):
            header += f", dense: {value(dense.iloc[0], metric)}"
        columns = (["tag"] if tagged else []) + ["sparsity", "configuration",
                                                 "perplexity [95%]" if ppl else "mean ± SE"]
        columns += [f"{unit} vs {b}" for b in baselines]
        rows = []
        pruned = table[(table["method"] != "dense") & table[metric].notna()]
        for (tag, sparsity), group in pruned.groupby(["tag", "sparsity"], sort=True):
            reference = {m: r for m, r in ((r["method"], r) for _, r in group.iterrows()) if m in baselines}
            for _, row in group.iterrows():
                cells = ([tag] if tagged else []) + [f"{sparsity:.0%}", row["method"], value(row, metric)]
                for baseline in baselines:
                    other = reference.get(baseline)
                    if other is None or other["model"] == row["model"]:
                        cells.append("")
                        continue
                    d = difference(items[(tag, row["model"])], items[(tag, other["model"])], metric, _tasks(table))
                    cells.append(_interval_text(d, fmt, scale))
                    cells[-1] += " *" if d is not None and d.resolved else ""
                rows.append(cells)
        sections += [header, "", pd.DataFrame(rows, columns=columns).to_markdown(index=False, disable_numparse=True),
                     ""]
    if not sections:
        raise BenchError("the results hold no perplexity or zero-shot measurement to tabulate")
    if "acc mean" in _quality_metrics(table):
        sections += ["### zero-shot accuracy per task (% ± SE)", "", _task_table(table), ""]
    return "\n".join(sections)


def summary_table(table: pd.DataFrame, tasks: list[str] | None = None) -> str:
    """Markdown: one row per (tag, sparsity, configuration), dense first within each tag, with both perplexities
    and their intervals, the zero-shot mean (over `tasks`) with its standard error, the realised sparsity of the
    prunable parameters and of the whole model, prune seconds and the vLLM speed-up over the tag's dense model
    with its range over repeats (the cross-model table: one tag per model's store)."""
    table = _restrict_tasks(table, tasks) if tasks else table
    ppl = [c for c in _quality_metrics(table) if c.startswith("ppl ")]
    columns = ["model", "sparsity", "method", *(f"{DATASET_NAMES.get(m[4:], m[4:])} ppl [95%]" for m in ppl)]
    if "acc mean" in table and table["acc mean"].notna().any():
        columns.append(f"mean acc (%) ± SE, {', '.join(TASK_NAMES.get(t, t) for t in _tasks(table))}")
    columns += ["sparsity realised, prunable / whole (%)", "prune s", "vLLM speed-up (range)"]
    rows = []
    for tag, group in table.groupby("tag", sort=False):
        order = group.assign(_dense=group["method"] != "dense").sort_values(["_dense", "sparsity"], kind="stable")
        for _, row in order.iterrows():
            cells = [tag, f"{row['sparsity']:.0%}", row["method"], *(_ppl_text(row, m) or "" for m in ppl)]
            if len(columns) > len(cells) + 3:
                cells.append(_acc_text(row, "acc mean") or "")
            dense = row["method"] == "dense"
            realised = f"{row['sparsity_realised'] * 100:.1f} / {row['model_sparsity_realised'] * 100:.1f}"
            cells.append("-" if dense else realised)
            cells.append("-" if dense or pd.isna(row.get("prune_seconds")) else f"{row['prune_seconds']:.0f}")
            cells.append((_speedup_text(row) or "") if "speedup" in row else "")
            rows.append(cells)
    return pd.DataFrame(rows, columns=columns).to_markdown(index=False, disable_numparse=True)
