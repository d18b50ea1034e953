"""The comparison report: results-store records -> pandas markdown tables + matplotlib plots in reports/.

Everything is computed from the records of one run (the latest `run` record names its models and
protocols), so the report can be rebuilt from the JSONL alone: `fasp-bench report --results FILE`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .errors import BenchError  # noqa: E402
from .store import ResultsStore  # noqa: E402

PLOTS = ("perplexity.png", "throughput.png", "pareto.png", "memory.png")


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


def model_table(records: list[dict], run: dict | None = None) -> pd.DataFrame:
    """One row per model of the run, dense first: size, quality, prune time, serving."""
    run = run or latest_run(records)
    plan = run["result"]
    rows = []
    for model in plan["models"]:
        fp = model["fingerprint"]
        row = {"model": model["label"], "method": model.get("method") or "dense",
               "sparsity": model.get("sparsity", 0.0)}
        row.update({k: model.get(k) for k in ("params", "sparsity_realised", "model_sparsity_realised",
                                              "prune_seconds")})
        if row["method"] == "dense":
            row["sparsity_realised"] = row["model_sparsity_realised"] = 0.0
        for dataset, r in _select(records, fp, "perplexity", plan["ppl_match"]).items():
            row[f"ppl {dataset}"] = r["result"]["ppl"]
        accs = []
        for task, r in _select(records, fp, "zeroshot", plan["zeroshot_match"]).items():
            row[f"acc {task}"] = r["result"]["acc"]
            accs.append(r["result"]["acc"])
        row["acc mean"] = sum(accs) / len(accs) if accs else None
        serving = _select(records, fp, "serving", plan["serve_match"]).get("serving")
        result = serving["result"] if serving else {}
        row["out tok/s"] = result.get("output_tok_s")
        row["TTFT ms"] = result["ttft_s"] * 1000 if "ttft_s" in result else None
        row["weight MB"] = result["weight_bytes"] / 1e6 if "weight_bytes" in result else None
        row["KV tokens"] = result.get("kv_cache_tokens")
        row["peak RSS MB"] = result["peak_rss_bytes"] / 1e6 if "peak_rss_bytes" in result else None
        row["serving error"] = result.get("error")
        rows.append(row)
    table = pd.DataFrame(rows)
    dense = table.iloc[0]
    if dense["out tok/s"]:
        table.insert(table.columns.get_loc("out tok/s") + 1, "speedup", table["out tok/s"] / dense["out tok/s"])
    if dense["weight MB"]:
        table.insert(table.columns.get_loc("weight MB") + 1, "dense/weights", dense["weight MB"] / table["weight MB"])
    if dense["KV tokens"]:
        table.insert(table.columns.get_loc("KV tokens") + 1, "KV ratio", table["KV tokens"] / dense["KV tokens"])
    if table["serving error"].isna().all():
        table = table.drop(columns="serving error")
    return table


def _markdown(table: pd.DataFrame) -> str:
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="n/a")


def _plot(table: pd.DataFrame, out: Path) -> list[str]:
    pruned = table[table["method"] != "dense"]
    methods = sorted(pruned["method"].unique())
    ppl_columns = [c for c in table.columns if c.startswith("ppl ")]

    fig, axes = plt.subplots(1, max(1, len(ppl_columns)), figsize=(5 * max(1, len(ppl_columns)), 4), squeeze=False)
    for ax, column in zip(axes[0], ppl_columns):
        for method in methods:
            rows = pruned[pruned["method"] == method].sort_values("sparsity")
            ax.plot(rows["sparsity"], rows[column], marker="o", label=method)
        ax.axhline(table.iloc[0][column], color="gray", linestyle="--", label="dense")
        ax.set(title=column.replace("ppl ", "perplexity: "), xlabel="sparsity (prunable)", ylabel="perplexity")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for method in methods:
        rows = pruned[pruned["method"] == method].sort_values("sparsity")
        ax.plot(rows["sparsity"], rows["out tok/s"], marker="o", label=method)
    ax.axhline(table.iloc[0]["out tok/s"], color="gray", linestyle="--", label="dense")
    ax.set(title="vLLM output throughput", xlabel="sparsity (prunable)", ylabel="output tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close(fig)

    quality = ppl_columns[0] if ppl_columns else None
    fig, ax = plt.subplots(figsize=(5, 4))
    if quality:
        for method in ["dense", *methods]:
            rows = table[table["method"] == method]
            ax.scatter(rows["out tok/s"], rows[quality], label=method)
            for _, r in rows.iterrows():
                ax.annotate(f"{r['sparsity']:.0%}" if method != "dense" else "dense", (r["out tok/s"], r[quality]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto(table.dropna(subset=["out tok/s", quality]), "out tok/s", quality)
        ax.plot(front["out tok/s"], front[quality], color="black", linewidth=1, label="Pareto front")
        ax.set(title="quality vs throughput", xlabel="output tokens/s (higher is better)",
               ylabel=f"{quality} (lower is better)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(table["model"], table["weight MB"], color="tab:blue")
    axes[0].set(title="weights (serving dtype)", ylabel="MB")
    axes[1].bar(table["model"], table["KV tokens"], color="tab:orange")
    axes[1].set(title="KV-cache capacity at a fixed budget", ylabel="tokens")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=110)
    plt.close(fig)
    return list(PLOTS)


def _pareto(table: pd.DataFrame, faster: str, worse: str) -> pd.DataFrame:
    """Models not beaten on both throughput (higher) and perplexity (lower)."""
    ordered = table.sort_values(faster, ascending=False)
    front, best = [], float("inf")
    for _, row in ordered.iterrows():
        if row[worse] < best:
            front.append(row)
            best = row[worse]
    return pd.DataFrame(front).sort_values(faster)


def write_report(results: str | Path, out: str | Path, header: str = "") -> Path:
    """README.md + PNG plots + the results JSONL into `out`; returns the README path."""
    records = ResultsStore(results).records()
    run = latest_run(records)
    plan = run["result"]
    table = model_table(records, run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(table, out)
    if Path(results).resolve() != (out / "results.jsonl").resolve():
        shutil.copyfile(results, out / "results.jsonl")

    quality = ["model", "params", "sparsity_realised", "model_sparsity_realised"] + \
        [c for c in table.columns if c.startswith(("ppl ", "acc "))] + ["prune_seconds"]
    serving = ["model"] + [c for c in ("out tok/s", "speedup", "TTFT ms", "weight MB", "dense/weights", "KV tokens",
                                       "KV ratio", "peak RSS MB", "serving error") if c in table.columns]
    memory = _memory_summary(table)
    lines = [
        "# fasp-bench comparison", "",
        header.strip(), "",
        f"Profile **{plan['profile']}**, model `{plan['model']}`. Calibration: {plan['calibration']}.",
        f"Perplexity: {plan['ppl_note']}. Zero-shot: {plan['zeroshot_note']}. Serving: {plan['serve_note']}.",
        f"BOS: {plan['bos_note']}." if plan.get("bos_note") else "",
        "Sparsity is the fraction of prunable (attention + MLP) parameters removed; `model_sparsity_realised` is "
        "the fraction of all parameters.", "",
        "## Quality and size", "", _markdown(table[[c for c in quality if c in table.columns]]), "",
        "## Serving (vLLM)", "", _markdown(table[serving]), "",
        "## What pruning buys in memory", "", memory, "",
        "## Plots", "",
        "![perplexity vs sparsity](perplexity.png)", "![throughput vs sparsity](throughput.png)",
        "![quality vs throughput](pareto.png)", "![memory per model](memory.png)", "",
        f"Raw records: [`results.jsonl`](results.jsonl) (`fasp-bench report --results {out}/results.jsonl "
        f"--out {out}` rebuilds this page).", "",
    ]
    readme = out / "README.md"
    readme.write_text("\n".join(lines))
    return readme


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
