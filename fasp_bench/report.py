"""The comparison report: results-store records -> Findings, markdown tables with intervals, plots in reports/.

Everything is computed from the records of one run (the latest `run` record names its models and protocols),
so the report can be rebuilt from the JSONL alone: `fasp-bench report --results FILE`. Intervals come from the
per-item data stored with each record (stats.py); a record written before per-item data was kept still renders,
without an interval, and any comparison that needs it says "not resolved".
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from . import stats
from .errors import BenchError
from .plots import PLOTS, plot_all, plot_recovery, plot_sweep, plot_widths
from .serving.bench import ENGINE_PPL_TOLERANCE, OTHER_CPU_LIMIT, ServeProtocol, point_kind, ppl_gap
from .serving.roofline import share
from .store import ResultsStore

DATASET_NAMES = {"wikitext2": "WikiText-2", "c4-heldout": "c4-heldout", "c4": "C4",
                 "c4-calval": "c4-calval (calibration-side validation)"}
TASK_NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
              "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
__all__ = ["PLOTS", "Items", "difference", "findings", "latest_run", "model_table", "paired_table", "write_report"]


ONE_SHOT = "none"  # the recovery column of a model that was only pruned


def _comparable(pruned: pd.DataFrame):
    """The groups whose methods meet at equal size and equal training: (sparsity, recovery), one-shot first."""
    order = {r: (r != ONE_SHOT, t) for r, t in zip(pruned["recovery"], pruned["recovery_tokens"])}
    keys = sorted(dict.fromkeys(zip(pruned["sparsity"], pruned["recovery"])), key=lambda k: (k[0], order[k[1]]))
    for sparsity, recovery in keys:
        yield sparsity, recovery, pruned[(pruned["sparsity"] == sparsity) & (pruned["recovery"] == recovery)]


def latest_run(records: list[dict]) -> dict:
    runs = [r for r in records if r["metric"] == "run"]
    if not runs:
        raise BenchError("the results file has no run record: produce it with `fasp-bench run` (scripts/compare.py)")
    return runs[-1]


def _select(records: list[dict], fingerprint: str, metric: str, match: dict) -> dict[str, dict]:
    """Latest record per dataset/task for one model whose protocol agrees with `match`."""
    chosen = {}
    for r in records:
        if r["fingerprint"] != fingerprint or r["metric"] != metric:
            continue
        if any(r["protocol"].get(k) != v for k, v in match.items()):
            continue
        chosen[r["protocol"].get("dataset") or r["protocol"].get("task") or metric] = r
    return chosen


@dataclass
class Items:
    """Per-item data of one model: window NLLs per perplexity set; per task, each document's correctness and
    log-likelihood margin of the gold choice."""
    windows: dict[str, list[float]] = field(default_factory=dict)
    docs: dict[str, tuple[list, list[float]]] = field(default_factory=dict)  # task -> (doc ids, correct)
    margins: dict[str, tuple[list, list[float]]] = field(default_factory=dict)  # task -> (doc ids, margin)


def model_table(records: list[dict], run: dict | None = None) -> tuple[pd.DataFrame, dict[str, Items]]:
    """One row per model of the run, dense first, with every figure's interval; and each model's per-item data."""
    run = run or latest_run(records)
    plan = run["result"]
    rows, items = [], {}
    for model in plan["models"]:
        fp, label = model["fingerprint"], model["label"]
        item = items[label] = Items()
        row = {"model": label, "method": model.get("method") or "dense", "sparsity": model.get("sparsity", 0.0),
               "recovery": model.get("recovery") or ONE_SHOT, "recovery_tokens": model.get("recovery_tokens", 0),
               "recovery_seconds": model.get("recovery_seconds"), "recovered_from": model.get("recovered_from")}
        row.update({k: model.get(k) for k in ("params", "sparsity_realised", "model_sparsity_realised",
                                              "prune_seconds")})
        if row["method"] == "dense":
            row["sparsity_realised"] = row["model_sparsity_realised"] = 0.0
        for dataset, r in _select(records, fp, "perplexity", plan["ppl_match"]).items():
            row[f"ppl {dataset}"] = r["result"]["ppl"]
            if r["result"].get("window_nll"):
                item.windows[dataset] = r["result"]["window_nll"]
                ci = stats.perplexity_interval(item.windows[dataset])
                row[f"ppl {dataset} low"], row[f"ppl {dataset} high"] = ci.low, ci.high
        zeroshot = _select(records, fp, "zeroshot", plan["zeroshot_match"])
        for task, r in zeroshot.items():
            row[f"acc {task}"] = r["result"]["acc"]
            if r["result"].get("doc_acc"):
                item.docs[task] = (r["result"]["doc_ids"], r["result"]["doc_acc"])
                row[f"acc {task} se"] = stats.mean_stderr(r["result"]["doc_acc"])
            if r["result"].get("doc_margin"):
                item.margins[task] = (r["result"]["doc_ids"], r["result"]["doc_margin"])
                row[f"margin {task}"] = float(np.mean(r["result"]["doc_margin"]))
                row[f"margin {task} se"] = stats.mean_stderr(r["result"]["doc_margin"])
        serving = _select(records, fp, "serving", plan["serve_match"]).get("serving")
        result = serving["result"] if serving else {}
        row["out tok/s"] = result.get("output_tok_s")
        ranged = serving is not None and serving["protocol"].get("repeats", 1) > 1  # one repeat has no range
        row["out tok/s min"] = result.get("output_tok_s_min") if ranged else None
        row["out tok/s max"] = result.get("output_tok_s_max") if ranged else None
        row["TTFT ms"] = result["ttft_s"] * 1000 if "ttft_s" in result else None
        row["weight MB"] = result["weight_bytes"] / 1e6 if "weight_bytes" in result else None
        row["KV tokens"] = result.get("kv_cache_tokens")
        row["peak RSS MB"] = result["peak_rss_bytes"] / 1e6 if "peak_rss_bytes" in result else None
        row["served as"] = result.get("architecture")  # the project's Pruned* class (plugin) or the stock one
        row["serving error"] = result.get("error")
        rows.append(row)
    # a mean over the tasks every configuration of the run was scored on: a configuration missing one (an
    # interrupted run) gets none, rather than a mean over fewer tasks beside the others'
    tasks = _tasks(pd.DataFrame(rows))
    for row in rows:
        _task_mean(row, "acc", tasks)
        _task_mean(row, "margin", tasks)
    table = pd.DataFrame(rows)
    dense = table.iloc[0]
    if dense["out tok/s"]:
        table["speedup"] = table["out tok/s"] / dense["out tok/s"]
        # the range of the ratio over every pair of repeats: slowest model run / fastest dense run, and back
        table["speedup low"] = table["out tok/s min"] / dense["out tok/s max"]
        table["speedup high"] = table["out tok/s max"] / dense["out tok/s min"]
    if dense["weight MB"]:
        table["dense/weights"] = dense["weight MB"] / table["weight MB"]
    if dense["KV tokens"]:
        table["KV ratio"] = table["KV tokens"] / dense["KV tokens"]
    return table, items


def _task_mean(row: dict | pd.Series, statistic: str, tasks: list[str]) -> None:
    """`{statistic} mean` and its standard error over `tasks`: None unless every task has the statistic."""
    values = [row.get(f"{statistic} {t}") for t in tasks]
    complete = bool(tasks) and all(v is not None and not pd.isna(v) for v in values)
    row[f"{statistic} mean"] = float(np.mean(values)) if complete else None
    stderrs = [row.get(f"{statistic} {t} se") for t in tasks]
    row[f"{statistic} mean se"] = (stats.task_mean_stderr(stderrs) if complete and all(
        s is not None and not pd.isna(s) for s in stderrs) else None)


def width_table(plan: dict) -> pd.DataFrame:
    """Per pruned model and layer: FFN width and V head width, beside the dense model's (from the prune records
    the run holds; a record older than widths in the store contributes nothing)."""
    rows = []
    for model in plan["models"]:
        for source, method in (("dense_widths", "dense"), ("widths", model.get("method"))):
            widths = model.get(source)
            if not widths or not method:
                continue
            for layer, (ffn, v) in enumerate(zip(widths["ffn_widths"], widths["v_head_dims"])):
                rows.append({"method": method, "sparsity": model["sparsity"], "layer": layer, "ffn width": ffn,
                             "v width": v})
    return pd.DataFrame(rows).drop_duplicates() if rows else pd.DataFrame()


def width_search_table(plan: dict) -> pd.DataFrame:
    """Per model pruned with searched widths: the KL to dense of the two start plans and of the plan found (the
    search's stitched models, on its calibration-side selection tokens), and its seconds and evaluations."""
    rows = []
    for model in plan["models"]:
        search = model.get("width_search")
        if not search:
            continue
        start_kl = search["start_kl"]
        rows.append({"Model": model["label"], "KL, uniform start": start_kl.get("uniform"),
                     "KL, adaptive start": start_kl.get("adaptive"), "Start": search["start"],
                     "KL, found": search["best_kl"], "Evaluations": search["evaluations"],
                     "Tokens per step": "/".join(map(str, search["selection_tokens"])),
                     "Database (s)": search["seconds"]["database"], "Search (s)": search["seconds"]["search"]})
    return pd.DataFrame(rows)


def _width_search_section(table: pd.DataFrame) -> list[str]:
    if table.empty:
        return []
    return ["## Width search", "",
            "KL(dense || model) per token of the next-token distributions, on the search's calibration-side "
            "selection tokens (its last step), for the stitched models it compares: the better start plan is the "
            "parent of the first generation. The final checkpoint is the found plan cut by the sequential pass.", "",
            _markdown(table, {"Database (s)": 0, "Search (s)": 0}), ""]


def sweep_table(records: list[dict], models: list[dict], points: list[dict]) -> pd.DataFrame:
    """One row per (model, serving point), `models` as a run record lists them (dense first): throughput (decode:
    output tok/s; prefill: prompt tok/s) with its range, the speed-up over dense at the same point with its range,
    the limit (dense's bytes per decode step or prefill FLOPs over the model's, stored with each record) and the
    share of it realised."""
    rows = []
    for point in points:
        for model in models:
            found = _select(records, model["fingerprint"], "serving", point).get("serving")
            result = found["result"] if found else {}
            roof = result.get("roofline") or {}
            kind = point_kind(ServeProtocol(**point))
            runs = result.get("prompt_tok_s_runs" if kind == "prefill" else "output_tok_s_runs") or []
            rows.append({"model": model["label"], "method": model.get("method") or "dense",
                         "sparsity": model.get("sparsity", 0.0), "kind": kind, "batch": point["prompts"],
                         "input_len": point["input_len"], "output_len": point["output_len"],
                         "tok/s": pd.Series(runs).median() if runs else None,
                         "tok/s min": min(runs) if runs else None, "tok/s max": max(runs) if runs else None,
                         "bound": roof.get("bound"), "other cpu": result.get("other_cpu"),
                         "error": result.get("error")})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    keys = ["kind", "batch", "input_len", "output_len"]
    dense = table[table["method"] == "dense"].set_index(keys)
    ref = dense.reindex(pd.MultiIndex.from_frame(table[keys]))
    table["speedup"] = table["tok/s"].to_numpy() / ref["tok/s"].to_numpy()
    table["speedup low"] = table["tok/s min"].to_numpy() / ref["tok/s max"].to_numpy()
    table["speedup high"] = table["tok/s max"].to_numpy() / ref["tok/s min"].to_numpy()
    table["limit"] = ref["bound"].to_numpy() / table["bound"].astype(float).to_numpy()
    table["share"] = [share(r["speedup"], r["limit"]) for _, r in table.iterrows()]
    return table


def engine_ppl_table(records: list[dict], run: dict | None = None) -> pd.DataFrame:
    """Every served checkpoint's perplexity computed by vLLM (prompt logprobs) beside transformers' on the same
    windows, the relative gap and whether it is inside the tolerance of the serving dtype."""
    run = run or latest_run(records)
    plan = run["result"]
    match = plan.get("served_ppl_match")
    rows = []
    for model in plan["models"] if match else []:
        reference = _select(records, model["fingerprint"], "perplexity", plan["ppl_match"])
        for dataset, served in _select(records, model["fingerprint"], "served_perplexity", match).items():
            ours = reference.get(dataset)
            engine = served["result"].get("ppl")
            theirs = _leading_ppl(ours["result"], served["result"].get("windows")) if ours else None
            gap, agrees = ppl_gap(engine, theirs, match["dtype"]) if engine and theirs else (None, False)
            rows.append({"model": model["label"], "dataset": dataset, "windows": served["result"].get("windows"),
                         "transformers": theirs, "vLLM": engine,
                         "gap": gap, "tolerance": ENGINE_PPL_TOLERANCE[match["dtype"]],
                         "status": (served["result"].get("error") or "no transformers record" if gap is None
                                    else "agrees" if agrees else "FAILED: the served model differs")})
    return pd.DataFrame(rows)


def _leading_ppl(result: dict, windows: int | None) -> float | None:
    """Perplexity over the first `windows` windows of a perplexity record (all of them when None): the windows the
    engine scored, where it scored fewer than transformers did."""
    nll = result.get("window_nll")
    if not windows or nll is None or windows == len(nll):
        return result["ppl"]
    return math.exp(math.fsum(nll[:windows]) / windows) if windows < len(nll) else None


def kv_table(records: list[dict], run: dict | None = None, seq_len: int = 2048) -> pd.DataFrame:
    """KV cache as a deployment figure at the run's fixed budget: bytes per token at the checkpoint's widths and
    as the engine stores them, and the most `seq_len`-token sequences that fit (computed, and as the engine
    allocated its cache)."""
    run = run or latest_run(records)
    plan = run["result"]
    budget = plan["serve_match"].get("kv_cache_gib", 0) << 30
    rows = []
    for model in plan["models"]:
        found = _select(records, model["fingerprint"], "serving", plan["serve_match"]).get("serving")
        result = found["result"] if found else {}
        roof = result.get("roofline")
        if not roof:
            continue
        per_token = roof["kv_bytes_per_token"]
        rows.append({"model": model["label"], "KV bytes/token": per_token,
                     "KV bytes/token, V padded": roof["kv_bytes_per_token_padded_v"],
                     f"{seq_len}-token sequences in budget": budget // (per_token * seq_len) if per_token else None,
                     f"{seq_len}-token sequences, engine": (result["kv_cache_tokens"] // seq_len
                                                           if result.get("kv_cache_tokens") else None)})
    return pd.DataFrame(rows)


def _paired_docs(a: dict[str, tuple[list, list[float]]], b: dict[str, tuple[list, list[float]]],
                 tasks: list[str]) -> tuple[list, list] | None:
    """Both models' per-document values (`Items.docs` or `Items.margins`) on the same documents of every task,
    or None if any task lacks per-document data."""
    pairs_a, pairs_b = [], []
    for task in tasks:
        if task not in a or task not in b:
            return None
        ids_a, acc_a = a[task]
        by_id = dict(zip(*b[task]))
        common = [(x, by_id[i]) for i, x in zip(ids_a, acc_a) if i in by_id]
        if not common:
            return None
        pairs_a.append([x for x, _ in common])
        pairs_b.append([y for _, y in common])
    return pairs_a, pairs_b


def difference(a: Items, b: Items, metric: str, tasks: list[str]) -> stats.Interval | None:
    """a - b on one metric ("ppl DATASET": log-perplexity; "acc mean": mean accuracy; "margin mean": mean
    log-likelihood margin of the gold choice), paired over the same windows or documents; None where either
    record lacks per-item data."""
    if metric.startswith("ppl "):
        wa, wb = a.windows.get(metric[4:]), b.windows.get(metric[4:])
        return stats.paired_log_ppl_difference(wa, wb) if wa and wb and len(wa) == len(wb) else None
    per_doc = (a.margins, b.margins) if metric == "margin mean" else (a.docs, b.docs)
    docs = _paired_docs(*per_doc, tasks) if tasks else None
    return stats.paired_document_difference(*docs) if docs else None


def _quality_metrics(table: pd.DataFrame) -> list[str]:
    metrics = [c for c in table.columns if c.startswith("ppl ") and not c.endswith((" low", " high"))]
    return metrics + [m for m in ("acc mean", "margin mean") if m in table and table[m].notna().any()]


# how each zero-shot statistic reads in the Findings and tables: name, unit of a difference, format, scale
ZEROSHOT_STATISTICS = {
    "acc mean": ("mean zero-shot accuracy", "Δ points", "+.1f", 100),
    "margin mean": ("mean log-likelihood margin of the gold choice (nats; gold minus the best wrong choice)",
                    "Δ nats", "+.3f", 1),
}


def _tasks(table: pd.DataFrame) -> list[str]:
    return [c[4:] for c in table.columns if c.startswith("acc ") and not c.endswith(" se") and c != "acc mean"]


def paired_table(table: pd.DataFrame, items: dict[str, Items]) -> pd.DataFrame:
    """Every pair of methods at one sparsity: paired differences (a - b) with 95% intervals; NaN where a record
    has no per-item data."""
    rows = []
    pruned = table[table["method"] != "dense"]
    for sparsity, recovery, group in _comparable(pruned):
        for (_, a), (_, b) in combinations(group.iterrows(), 2):
            row = {"sparsity": sparsity, "recovery": recovery, "a": a["model"], "b": b["model"],
                   "method a": a["method"], "method b": b["method"]}
            for metric in _quality_metrics(table):
                d = difference(items[a["model"]], items[b["model"]], metric, _tasks(table))
                if d is not None:
                    row.update({f"d {metric}": d.estimate, f"d {metric} low": d.low, f"d {metric} high": d.high})
            rows.append(row)
    return pd.DataFrame(rows)


def _interval_text(d: stats.Interval | None, fmt: str, scale: float = 1.0) -> str:
    if d is None:
        return "n/a: a record without per-item data"
    return f"{d.estimate * scale:{fmt}} [{d.low * scale:{fmt}}, {d.high * scale:{fmt}}]"


def findings(table: pd.DataFrame, items: dict[str, Items]) -> list[str]:
    """Plain-word findings per sparsity: the best method on each metric and whether its lead over each other
    method is resolved (the same paired differences as the paired table, taken best - other)."""
    lines = []
    pruned = table[table["method"] != "dense"]
    for sparsity, recovery, group in _comparable(pruned):
        one_shot = pruned[(pruned["sparsity"] == sparsity) & (pruned["recovery"] == ONE_SHOT)]
        lines.append(f"**{sparsity:.0%} sparsity**" if recovery == ONE_SHOT
                     else f"**{sparsity:.0%} sparsity, after recovery {recovery}**")
        if len(group) < 2:
            lines.append(f"- only {group.iloc[0]['model']} at this sparsity: nothing to compare.")
        for metric in _quality_metrics(table) if len(group) > 1 else []:
            ppl = metric.startswith("ppl ")
            ranked = group.dropna(subset=[metric]).sort_values(metric, ascending=ppl)
            if len(ranked) < 2:
                continue
            best = ranked.iloc[0]
            name, unit, fmt, scale = (f"{DATASET_NAMES.get(metric[4:], metric[4:])} perplexity", "Δ log-ppl",
                                      "+.3f", 1) if ppl else ZEROSHOT_STATISTICS[metric]
            leads, resolved = [], 0
            for _, other in ranked.iloc[1:].iterrows():
                d = difference(items[best["model"]], items[other["model"]], metric, _tasks(table))
                resolved += bool(d and d.resolved)
                verdict = "resolved" if d and d.resolved else "not resolved"
                leads.append(f"over {other['method']}: {verdict} ({unit} {_interval_text(d, fmt, scale)})")
            value = (f"{best[metric]:.2f}" if ppl else f"{best[metric]:.1%}" if metric == "acc mean"
                     else f"{best[metric]:+.3f}")
            lines.append(f"- {name}: {best['method']} is {'lowest' if ppl else 'highest'} ({value}); its lead "
                         + "; ".join(leads) + "." + _ranking_note(ranked, one_shot, metric, recovery))
            if metric == "acc mean" and not resolved:
                lines.append("  Accuracy does not rank these methods at this profile: no lead is resolved"
                             + ("; the paired log-likelihood margin below is the statistic that decides."
                                if "margin mean" in _quality_metrics(group) else
                                " (more documents per task would be needed)."))
        speed = group.dropna(subset=["out tok/s"])
        if len(speed) and "speedup" in speed:
            fastest = speed.sort_values("out tok/s", ascending=False).iloc[0]
            if pd.isna(fastest["speedup low"]):
                spread = "one repeat, so its speed-up over dense is not resolved"
            else:
                verdict = "resolved" if fastest["speedup low"] > 1 or fastest["speedup high"] < 1 else "not resolved"
                spread = (f"range {fastest['speedup low']:.2f}-{fastest['speedup high']:.2f}x over repeats; "
                          f"its speed-up over dense is {verdict}")
            lines.append(f"- vLLM throughput: {fastest['method']} is fastest ({fastest['speedup']:.2f}x dense; "
                         f"{spread}).")
        if recovery != ONE_SHOT and len(speed) and "speedup" in speed:
            lines.append(_served_unchanged(speed, table))
        lines.append("")
    return lines


def _served_unchanged(recovered: pd.DataFrame, table: pd.DataFrame) -> str:
    """Recovery keeps the pruned shapes, so serving speed must not move: each recovered model's speed-up range
    against its one-shot model's."""
    by_label = table.set_index("model")
    notes = []
    for _, row in recovered.iterrows():
        before = by_label.loc[row["recovered_from"]] if row["recovered_from"] in by_label.index else None
        if before is None or pd.isna(before.get("speedup")):
            continue
        if pd.isna(row["speedup low"]) or pd.isna(before["speedup low"]):
            verdict = "one repeat, not comparable"
        else:
            overlap = row["speedup low"] <= before["speedup high"] and before["speedup low"] <= row["speedup high"]
            verdict = "unchanged within the repeats' ranges" if overlap else "**changed beyond the repeats' ranges**"
        notes.append(f"{row['method']} {row['speedup']:.2f}x against {before['speedup']:.2f}x one-shot ({verdict})")
    return "- vLLM throughput after recovery: " + "; ".join(notes) + "." if notes else ""


def _ranking_note(ranked: pd.DataFrame, one_shot: pd.DataFrame, metric: str, recovery: str) -> str:
    """After recovery: whether the methods keep the one-shot order on this metric at this sparsity."""
    if recovery == ONE_SHOT:
        return ""
    before = one_shot.dropna(subset=[metric]).sort_values(metric, ascending=metric.startswith("ppl "))
    before = [m for m in before["method"] if m in set(ranked["method"])]
    after = list(ranked["method"])
    if len(before) != len(after):
        return ""
    if before == after:
        return f" The one-shot order ({' > '.join(after)}) holds."
    return f" The order changes: {' > '.join(after)} here, {' > '.join(before)} one-shot."


def _human_quality(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"Model": table["model"], "Params (M)": table["params"] / 1e6,
                        "Sparsity, prunable (%)": table["sparsity_realised"] * 100,
                        "Sparsity, whole model (%)": table["model_sparsity_realised"] * 100})
    for column in table.columns:
        if column.startswith("ppl ") and not column.endswith((" low", " high")):
            name = DATASET_NAMES.get(column[4:], column[4:])
            out[f"{name} ppl [95% CI]"] = [_ppl_text(r, column) for _, r in table.iterrows()]
    for column in table.columns:
        if column.startswith("acc ") and not column.endswith(" se"):
            name = "Mean acc" if column == "acc mean" else TASK_NAMES.get(column[4:], column[4:]) + " acc"
            out[f"{name} (% ± SE)"] = [_acc_text(r, column) for _, r in table.iterrows()]
    if "margin mean" in _quality_metrics(table):
        out["Mean gold margin (nats ± SE)"] = [_margin_text(r, "margin mean") for _, r in table.iterrows()]
    out["Prune time (s)"] = table["prune_seconds"]
    if (table["recovery"] != ONE_SHOT).any():
        out.insert(1, "Recovery", table["recovery"])
        out["Recovery time (s)"] = table["recovery_seconds"]
    return out


def _ppl_text(row: pd.Series, column: str) -> str | None:
    if pd.isna(row.get(column)):
        return None
    if pd.isna(row.get(f"{column} low", math.nan)):
        return f"{row[column]:.2f}"
    return f"{row[column]:.2f} [{row[f'{column} low']:.2f}, {row[f'{column} high']:.2f}]"


def _acc_text(row: pd.Series, column: str) -> str | None:
    if pd.isna(row.get(column)):
        return None
    se = row.get(f"{column} se", math.nan)
    return f"{row[column] * 100:.1f}" + ("" if pd.isna(se) else f" ± {se * 100:.1f}")


def _margin_text(row: pd.Series, column: str) -> str | None:
    if pd.isna(row.get(column)):
        return None
    se = row.get(f"{column} se", math.nan)
    return f"{row[column]:+.3f}" + ("" if pd.isna(se) else f" ± {se:.3f}")


def _human_serving(table: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"Model": table["model"], "Output tok/s (median)": table["out tok/s"]})
    out["min-max over repeats"] = [None if pd.isna(r["out tok/s min"]) else
                                   f"{r['out tok/s min']:.1f}-{r['out tok/s max']:.1f}" for _, r in table.iterrows()]
    if "speedup" in table:
        out["Speed-up (range)"] = [_speedup_text(r) for _, r in table.iterrows()]
    out["TTFT (ms)"] = table["TTFT ms"]
    out["Weights (MB)"] = table["weight MB"]
    if "dense/weights" in table:
        out["Dense / model weights"] = table["dense/weights"]
    out["KV-cache tokens"] = table["KV tokens"]
    if "KV ratio" in table:
        out["KV capacity vs dense"] = table["KV ratio"]
    out["Peak RSS (MB)"] = table["peak RSS MB"]
    if table["served as"].notna().any():
        out["vLLM architecture"] = table["served as"]
    if table["serving error"].notna().any():
        out["Error"] = table["serving error"]
    return out


def _speedup_text(row: pd.Series) -> str | None:
    if pd.isna(row["speedup"]):
        return None
    if row["method"] == "dense":
        return "1.00x (reference)"
    if pd.isna(row["speedup low"]):
        return f"{row['speedup']:.2f}x"
    unresolved = row["speedup low"] <= 1 <= row["speedup high"]
    return (f"{row['speedup']:.2f}x ({row['speedup low']:.2f}-{row['speedup high']:.2f})"
            + (" not resolved" if unresolved else ""))


def _human_pairs(pairs: pd.DataFrame) -> pd.DataFrame:
    out = pd.DataFrame({"Sparsity (%)": pairs["sparsity"] * 100,
                        "A vs B": pairs["method a"] + " vs " + pairs["method b"]})
    if (pairs["recovery"] != ONE_SHOT).any():
        out.insert(1, "Recovery", pairs["recovery"])
    for column in pairs.columns:
        if column.startswith("d ") and not column.endswith((" low", " high")):
            metric = column[2:]
            ppl = metric.startswith("ppl ")
            name = (f"Δ log-ppl {DATASET_NAMES.get(metric[4:], metric[4:])}" if ppl else "Δ mean acc (points)"
                    if metric == "acc mean" else "Δ gold margin (nats)")
            fmt, scale = ("+.3f", 1) if ppl else ZEROSHOT_STATISTICS[metric][2:]
            out[f"{name} [95% CI]"] = [_bold(r, column, fmt, scale) for _, r in pairs.iterrows()]
    return out


def _bold(row: pd.Series, column: str, fmt: str, scale: float) -> str:
    if pd.isna(row.get(column, math.nan)):
        return "n/a"
    d = stats.Interval(row[column], row[f"{column} low"], row[f"{column} high"])
    return f"**{_interval_text(d, fmt, scale)}**" if d.resolved else _interval_text(d, fmt, scale)


def _markdown(table: pd.DataFrame, decimals: dict[str, int] | None = None) -> str:
    """Numbers with the given decimals (default: 4 significant digits); text cells exactly as formatted."""
    def cell(v, places):
        if v is None or (isinstance(v, float) and pd.isna(v)):
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f"{v:,.{places}f}" if places is not None else f"{v:.4g}"
        return str(v)

    cells = pd.DataFrame({c: [cell(v, (decimals or {}).get(c)) for v in table[c].astype(object)]
                          for c in table.columns}, dtype=object)
    return cells.to_markdown(index=False, missingval="n/a", disable_numparse=True)


def run_header(plan: dict) -> str:
    """Which command produced the run record, when and on what machine (a record written before the command
    was stored names neither command nor time)."""
    if "command" not in plan:
        return f"Measured on {plan['machine']}." if plan.get("machine") else ""
    return (f"Generated by `{plan['command']}` on {plan['finished_at']}, {plan['machine']}. "
            "Every number below comes from the records in results.jsonl.")


def write_report(results: str | Path, out: str | Path, header: str | None = None) -> Path:
    """README.md + PNG plots + the results JSONL into `out`; returns the README path. The header defaults to
    the latest run record's command, time and machine, so a page rebuilt from its store says what made it."""
    records = ResultsStore(results).records()
    run = latest_run(records)
    plan = run["result"]
    header = run_header(plan) if header is None else header
    table, items = model_table(records, run)
    pairs = paired_table(table, items)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_all(table, out)
    sweep = sweep_table(records, plan["models"], plan.get("sweep_match") or [])
    plots += plot_sweep(sweep, out)
    plots += plot_widths(width_table(plan), out)
    plots += plot_recovery(table, out)
    if Path(results).resolve() != (out / "results.jsonl").resolve():
        shutil.copyfile(results, out / "results.jsonl")
    lines = [
        "# fasp-bench comparison", "",
        header.strip(), "",
        f"Profile **{plan['profile']}**, model `{plan['model']}`. Calibration: {plan['calibration']}.",
        f"Perplexity: {plan['ppl_note']}. Zero-shot: {plan['zeroshot_note']}. Serving: {plan['serve_note']}.",
        f"BOS: {plan['bos_note']}." if plan.get("bos_note") else "",
        "Sparsity is the fraction of prunable (attention + MLP) parameters removed; the whole-model fraction "
        "counts embeddings too.", "",
        "## Findings", "",
        "Generated from the paired differences below: a lead is *resolved* when the 95% interval of the paired "
        "difference (bootstrap over the same windows or documents) excludes zero; a speed-up when its range over "
        "repeats excludes 1.0.", "",
        *findings(table, items),
        "## Quality and size", "",
        "Perplexity with a 95% bootstrap interval over windows; accuracy with its standard error over documents.", "",
        _markdown(_human_quality(table), {"Params (M)": 1, "Sparsity, prunable (%)": 1,
                                           "Sparsity, whole model (%)": 1, "Prune time (s)": 1,
                                           "Recovery time (s)": 0}), "",
        "## Paired differences (A - B, same windows and documents)", "",
        "Negative Δ log-ppl: A has the lower perplexity; positive Δ accuracy: A is more accurate. **Bold**: the "
        "95% paired-bootstrap interval excludes zero.", "",
        (_markdown(_human_pairs(pairs), {"Sparsity (%)": 0}) if not pairs.empty
         else "Only one method per sparsity: nothing to pair."), "",
        "## Serving (vLLM)", "",
        "Median output throughput with its min-max over repeats; the speed-up's range divides the model's slowest "
        "(fastest) repeat by dense's fastest (slowest); *not resolved*: that range includes 1.0.", "",
        _markdown(_human_serving(table), {"Output tok/s (median)": 1, "TTFT (ms)": 1, "Weights (MB)": 1,
                                           "Dense / model weights": 3, "KV-cache tokens": 0,
                                           "KV capacity vs dense": 3, "Peak RSS (MB)": 0}), "",
        *disturbed_section(sweep),
        *_sweep_section(sweep),
        "## What pruning buys in memory", "", _memory_summary(table), "",
        *_kv_section(kv_table(records, run), plan),
        *_width_search_section(width_search_table(plan)),
        *_engine_ppl_section(engine_ppl_table(records, run)),
        "## Plots", "",
        *(f"![{name[:-4]}]({name})" for name in plots), "",
        f"Raw records: [`results.jsonl`](results.jsonl) (`fasp-bench report --results {out}/results.jsonl "
        f"--out {out}` rebuilds this page).", "",
    ]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme


def human_sweep(sweep: pd.DataFrame) -> pd.DataFrame:
    """The sweep table as the report and `fasp-bench serve --sweep` print it."""
    out = pd.DataFrame({"Model": sweep["model"]})
    out["Regime"] = [f"{r['kind']}, batch {r['batch']}, {r['input_len']} in / {r['output_len']} out"
                     for _, r in sweep.iterrows()]
    out["tok/s (median)"] = sweep["tok/s"]
    out["min-max"] = [None if pd.isna(r["tok/s min"]) else f"{r['tok/s min']:.1f}-{r['tok/s max']:.1f}"
                      for _, r in sweep.iterrows()]
    out["Speed-up (range)"] = [_speedup_text(r) for _, r in sweep.iterrows()]
    out["Limit"] = [None if r["method"] == "dense" or pd.isna(r["limit"]) else f"{r['limit']:.3f}x"
                    for _, r in sweep.iterrows()]
    out["Share of limit"] = ["-" if r["share"] is None or pd.isna(r["share"]) else f"{r['share']:.2f}"
                             for _, r in sweep.iterrows()]
    if sweep["error"].notna().any():
        out["Error"] = sweep["error"]
    return out


SWEEP_NOTE = ("Decode points: output tok/s; prefill points (one output token): prompt tok/s. The limit is what the "
              "model's size allows over dense: bytes one decode step reads (matmul weights plus the batch's KV cache "
              "at the mean context, at the checkpoint's widths) or prefill matmul FLOPs, dense's over the model's. "
              "Share of limit: (speed-up - 1) / (limit - 1); \"-\" where nothing was pruned (limit 1).")


def step_overhead(sweep: pd.DataFrame) -> pd.DataFrame:
    """Per decode regime, the step time of every model of the run against the bytes it reads per step, fitted as
    a fixed overhead plus bytes over an effective bandwidth (least squares, at least 3 models). A step that is
    `overhead + bytes / bandwidth` realises a share of 1 - overhead / step of a model's limit: what the fixed
    per-step work (scheduling, kernel launches, norms, sampling) leaves to pruning."""
    import numpy as np

    rows = []
    if sweep.empty:
        return pd.DataFrame(rows)
    decode = sweep[(sweep["kind"] == "decode") & sweep["tok/s"].notna() & sweep["bound"].notna()]
    for (batch, input_len, output_len), group in decode.groupby(["batch", "input_len", "output_len"], sort=False):
        if len(group) < 3:
            continue
        step = batch / group["tok/s"].astype(float).to_numpy()  # seconds per decode step of the whole batch
        slope, overhead = np.polyfit(group["bound"].astype(float).to_numpy(), step, 1)
        dense = group[group["method"] == "dense"]
        dense_step = float(batch / dense["tok/s"].iloc[0]) if len(dense) else float("nan")
        rows.append({"regime": f"decode, batch {batch}, {input_len} in / {output_len} out", "models": len(group),
                     "dense step (ms)": dense_step * 1e3, "fixed overhead (ms)": overhead * 1e3,
                     "effective GB/s": (1 / slope / 1e9) if slope > 0 else None,
                     "share the overhead allows": 1 - overhead / dense_step})
    return pd.DataFrame(rows)


def disturbed_section(sweep: pd.DataFrame) -> list[str]:
    """The serving points measured while other programs kept more than OTHER_CPU_LIMIT of the CPUs busy (stored
    per point; records from before the check hold none and are not judged)."""
    if sweep.empty:
        return []
    other = pd.to_numeric(sweep["other cpu"], errors="coerce")
    hit = sweep[other > OTHER_CPU_LIMIT]
    if hit.empty:
        return []
    points = ", ".join(f"{r['model']} at {r['batch']}x{r['input_len']}x{r['output_len']} ({r['other cpu']:.0%})"
                       for _, r in hit.iterrows())
    return [f"**Disturbed:** other programs kept more than {OTHER_CPU_LIMIT:.0%} of the CPUs busy while these "
            f"were measured, so their throughput is low and a speed-up against them is not to be trusted: {points}. "
            "Measure them again on an idle machine (`fasp-bench run ... --remeasure-serving`).", ""]


def _sweep_section(sweep: pd.DataFrame) -> list[str]:
    if sweep.empty or len(sweep.drop_duplicates(["kind", "batch", "input_len", "output_len"])) < 2:
        return []
    lines = ["## Serving across load regimes", "", SWEEP_NOTE, "",
             _markdown(human_sweep(sweep), {"tok/s (median)": 1}), ""]
    overhead = step_overhead(sweep)
    if not overhead.empty:
        lines += ["Why a share stays below 1: each decode step's time (batch / output tok/s) of every model above, "
                  "fitted as a fixed overhead plus bytes read over an effective bandwidth. A model whose step is "
                  "that overhead plus its bytes realises about 1 - overhead / step of its limit.", "",
                  _markdown(overhead, {"dense step (ms)": 2, "fixed overhead (ms)": 2, "effective GB/s": 1,
                                       "share the overhead allows": 2}), ""]
    return lines


def _engine_ppl_section(ppl: pd.DataFrame) -> list[str]:
    if ppl.empty:
        return []
    out = pd.DataFrame({"Model": ppl["model"], "Set": ppl["dataset"].map(lambda d: DATASET_NAMES.get(d, d)),
                        "Windows": ppl["windows"], "transformers ppl": ppl["transformers"], "vLLM ppl": ppl["vLLM"]})
    out["Gap (%)"] = [None if pd.isna(g) else f"{g * 100:+.3f}" for g in ppl["gap"]]
    out["Tolerance (%)"] = ppl["tolerance"] * 100
    out["Status"] = ppl["status"]
    failed = (ppl["status"] != "agrees").sum()
    return ["## Quality inside the engine", "",
            "Perplexity of every served checkpoint computed by vLLM from its prompt logprobs, on the windows "
            "transformers scored above (the first ones where Windows is fewer; transformers' perplexity here is "
            "over the same windows); a gap beyond the serving dtype's tolerance means vLLM serves a different "
            "model than the one evaluated (a loading or plugin fault) and is reported as a failure. "
            + (f"**{failed} of {len(ppl)} failed.**" if failed else f"All {len(ppl)} agree."), "",
            _markdown(out, {"Windows": 0, "transformers ppl": 3, "vLLM ppl": 3, "Tolerance (%)": 1}), ""]


def _kv_section(kv: pd.DataFrame, plan: dict) -> list[str]:
    if kv.empty:
        return []
    gib = plan["serve_match"].get("kv_cache_gib")
    return ["", f"KV cache at the fixed budget of {gib} GiB: bytes per token at the checkpoint's widths, and as an "
            "engine that stores V at the head size holds it (vLLM's CPU attention pads a narrowed V); the most "
            "2048-token sequences that fit, at the checkpoint's widths and as the engine allocated its cache.", "",
            _markdown(kv, {c: 0 for c in kv.columns if c != "model"}), ""]


def _memory_summary(table: pd.DataFrame) -> str:
    if table["weight MB"].isna().all():
        return "No serving measurements in this run."
    dense = table.iloc[0]
    lines = [f"Dense: {dense['weight MB']:.1f} MB of weights, {dense['KV tokens']:,.0f} KV-cache tokens, "
             f"peak RSS {dense['peak RSS MB']:.0f} MB."]
    for _, row in table.iloc[1:].iterrows():
        if pd.isna(row["weight MB"]):
            continue
        saved = dense["weight MB"] - row["weight MB"]
        lines.append(f"- {row['model']}: weights -{saved:.1f} MB ({saved / dense['weight MB']:.1%}), "
                     f"KV capacity x{row['KV tokens'] / dense['KV tokens']:.3f}, "
                     f"peak RSS {row['peak RSS MB'] - dense['peak RSS MB']:+.0f} MB")
    return "\n".join(lines)
