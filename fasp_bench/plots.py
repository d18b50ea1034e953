"""The report's matplotlib figures, from the model table of report.py: every plot has the dense reference and,
where the records carry per-item data, error bars (perplexity: 95% bootstrap interval; accuracy: standard
error; throughput: min-max over repeats)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

PLOTS = ("perplexity.png", "zeroshot.png", "throughput.png", "pareto.png", "memory.png")
SWEEP_PLOT = "sweep.png"  # only where the run measured more than one decode batch size
RECOVERY_PLOT = "recovery.png"  # only where the run recovered its pruned models
WIDTHS_PLOT = "widths.png"  # only where the store's prune records hold per-layer widths


def _errors(rows: pd.DataFrame, column: str, low: str, high: str) -> list | None:
    """Asymmetric error bars from interval columns (None where no row has them)."""
    if low not in rows or rows[low].isna().all():
        return None
    return [(rows[column] - rows[low]).fillna(0).tolist(), (rows[high] - rows[column]).fillna(0).tolist()]


def _by_sparsity(ax, table: pd.DataFrame, column: str, low: str, high: str, scale: float = 1.0) -> None:
    """One line per method over sparsity with error bars (the one-shot models), and the dense model as a dashed
    reference line."""
    pruned = table[(table["method"] != "dense") & (table["recovery"] == "none")]
    for method in dict.fromkeys(pruned["method"]):
        rows = pruned[pruned["method"] == method].sort_values("sparsity")
        errors = _errors(rows, column, low, high)
        ax.errorbar(rows["sparsity"] * 100, rows[column] * scale, capsize=3, marker="o", label=method,
                    yerr=None if errors is None else [[e * scale for e in side] for side in errors])
    dense = table.iloc[0]
    if not pd.isna(dense.get(column)):
        ax.axhline(dense[column] * scale, color="gray", linestyle="--", label="dense")
        if not pd.isna(dense.get(low)):
            ax.axhspan(dense[low] * scale, dense[high] * scale, color="gray", alpha=0.15)
    ax.set_xlabel("sparsity of prunable parameters (%)")
    ax.legend(fontsize=8)


def plot_all(table: pd.DataFrame, out: Path) -> list[str]:
    ppl_columns = [c for c in table.columns if c.startswith("ppl ") and not c.endswith((" low", " high"))]
    panels = max(1, len(ppl_columns))
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), squeeze=False)
    for ax, column in zip(axes[0], ppl_columns):
        _by_sparsity(ax, table, column, f"{column} low", f"{column} high")
        ax.set(title=f"perplexity: {column[4:]} (95% CI)", ylabel="perplexity (lower is better)")
    _save(fig, out / "perplexity.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    if "acc mean" in table and table["acc mean"].notna().any():
        table = table.assign(**{"acc mean low": table["acc mean"] - table["acc mean se"].astype(float),
                                "acc mean high": table["acc mean"] + table["acc mean se"].astype(float)})
        _by_sparsity(ax, table, "acc mean", "acc mean low", "acc mean high", scale=100)
    ax.set(title="mean zero-shot accuracy (± SE)", ylabel="accuracy (%)")
    _save(fig, out / "zeroshot.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    if table["out tok/s"].notna().any():
        _by_sparsity(ax, table, "out tok/s", "out tok/s min", "out tok/s max")
    ax.set(title="vLLM output throughput (median, min-max)", ylabel="output tokens/s (higher is better)")
    _save(fig, out / "throughput.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    quality = ppl_columns[0] if ppl_columns else None
    if quality and table["out tok/s"].notna().any():
        for method in dict.fromkeys(table["method"]):
            rows = table[table["method"] == method]
            ax.scatter(rows["out tok/s"], rows[quality], label=method, marker="*" if method == "dense" else "o")
            for _, r in rows.iterrows():
                ax.annotate("dense" if method == "dense" else f"{r['sparsity']:.0%}", (r["out tok/s"], r[quality]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")
        front = _pareto(table.dropna(subset=["out tok/s", quality]), "out tok/s", quality)
        ax.plot(front["out tok/s"], front[quality], color="black", linewidth=1, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set(title="quality vs throughput", xlabel="output tokens/s (higher is better)",
           ylabel=f"{quality or 'perplexity'} (lower is better)")
    _save(fig, out / "pareto.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].bar(table["model"], table["weight MB"].fillna(0), color="tab:blue")
    axes[0].set(title="weights (serving dtype)", ylabel="MB")
    axes[1].bar(table["model"], table["KV tokens"].fillna(0), color="tab:orange")
    axes[1].set(title="KV-cache capacity at a fixed budget", ylabel="tokens")
    for ax in axes:
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    _save(fig, out / "memory.png")
    return list(PLOTS)


def plot_recovery(table: pd.DataFrame, out: Path) -> list[str]:
    """Perplexity against recovery tokens (0: one-shot), one line per method and sparsity, dense dashed."""
    pruned = table[table["method"] != "dense"]
    if (pruned["recovery"] == "none").all():
        return []
    ppl_columns = [c for c in table.columns if c.startswith("ppl ") and not c.endswith((" low", " high"))]
    fig, axes = plt.subplots(1, max(1, len(ppl_columns)), figsize=(5.5 * max(1, len(ppl_columns)), 4.2),
                             squeeze=False)
    for ax, column in zip(axes[0], ppl_columns):
        for (method, sparsity), rows in pruned.groupby(["method", "sparsity"], sort=False):
            rows = rows.sort_values("recovery_tokens")
            ax.errorbar(rows["recovery_tokens"], rows[column], yerr=_errors(rows, column, f"{column} low",
                                                                         f"{column} high"),
                        capsize=3, marker="o", label=f"{method} {sparsity:.0%}")
        dense = table.iloc[0]
        if not pd.isna(dense.get(column)):
            ax.axhline(dense[column], color="gray", linestyle="--", label="dense")
        ax.set(title=f"{column[4:]} perplexity after recovery (95% CI)", xlabel="recovery tokens",
               ylabel="perplexity (lower is better)")
        ax.legend(fontsize=7)
    _save(fig, out / RECOVERY_PLOT)
    return [RECOVERY_PLOT]


def sweep_lines(sweep: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """The decode curves of a sweep: one per (pruned model, input and output lengths) that was measured at two
    or more batch sizes, its rows by batch size. A point at other lengths (the protocol's own serving point
    beside a sweep) starts no curve of its own and never joins one: its speed-up is not on the same axis."""
    if sweep.empty:
        return []
    decode = sweep[(sweep["kind"] == "decode") & (sweep["method"] != "dense")]
    lines = []
    for (model, input_len, output_len), rows in decode.groupby(["model", "input_len", "output_len"], sort=False):
        if rows["batch"].nunique() >= 2:
            lines.append((model, f"{input_len} in, {output_len} out", rows.sort_values("batch")))
    return lines


def plot_sweep(sweep: pd.DataFrame, out: Path) -> list[str]:
    """Decode speed-up against batch size, one line per pruned model and length pair, each with its limit dashed
    in its colour."""
    lines = sweep_lines(sweep)
    if not lines:
        return []
    all_lengths = list(dict.fromkeys(lengths for _, lengths, _ in lines))
    several_lengths = len(all_lengths) > 1
    fig, ax = plt.subplots(figsize=(6, 4.5))
    colours: dict[str, str] = {}
    for model, lengths, rows in lines:
        errors = _errors(rows, "speedup", "speedup low", "speedup high")
        line = ax.errorbar(rows["batch"], rows["speedup"], yerr=errors, capsize=3, marker="o",
                           color=colours.get(model), label=f"{model} ({lengths})" if several_lengths else model)
        colours[model] = line[0].get_color()
        ax.plot(rows["batch"], rows["limit"], linestyle="--", color=colours[model], linewidth=1)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set(title="decode speed-up over dense" + ("" if several_lengths else f", {all_lengths[0]}")
           + "\n(dashed: memory-bound limit)", xlabel="batch size (sequences)", ylabel="output tok/s over dense")
    ax.legend(fontsize=7)
    _save(fig, out / SWEEP_PLOT)
    return [SWEEP_PLOT]


def plot_widths(widths: pd.DataFrame, out: Path) -> list[str]:
    """Per-layer FFN width (top) and V head width (bottom) of every method, one column per sparsity, the dense
    widths dashed."""
    if widths.empty or (widths["method"] != "dense").sum() == 0:
        return []
    pruned = widths[widths["method"] != "dense"]
    sparsities = sorted(pruned["sparsity"].unique())
    fig, axes = plt.subplots(2, len(sparsities), figsize=(5.5 * len(sparsities), 7), squeeze=False)
    for col, sparsity in enumerate(sparsities):
        rows = widths[widths["sparsity"] == sparsity]
        for row, column in enumerate(("ffn width", "v width")):
            ax = axes[row][col]
            for method in dict.fromkeys(rows["method"]):
                layer_rows = rows[rows["method"] == method].sort_values("layer")
                dense = method == "dense"
                ax.plot(layer_rows["layer"], layer_rows[column], marker=None if dense else ".", label=method,
                        linestyle="--" if dense else "-", color="gray" if dense else None)
            ax.set(title=f"{column} per layer at {sparsity:.0%}", xlabel="layer", ylabel=column)
            ax.legend(fontsize=7)
    _save(fig, out / WIDTHS_PLOT)
    return [WIDTHS_PLOT]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pareto(table: pd.DataFrame, faster: str, worse: str) -> pd.DataFrame:
    """Models not beaten on both throughput (higher) and perplexity (lower)."""
    ordered = table.sort_values(faster, ascending=False)
    front, best = [], float("inf")
    for _, row in ordered.iterrows():
        if row[worse] < best:
            front.append(row)
            best = row[worse]
    return pd.DataFrame(front).sort_values(faster)
