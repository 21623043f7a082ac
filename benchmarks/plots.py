"""PNG plots for the benchmark results (matplotlib, Agg backend); each takes plain data from a result's JSON."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def balancedness_over_time(path: Path, timelines: dict[str, dict], title: str, shift_s: float | None = None) -> Path:
    """Balancedness (mean/max device busy time per bin) and tokens/s over time, one line per placement."""
    plt = _plt()
    fig, ax = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for label, tl in timelines.items():
        t = [x - tl["t"][0] + tl["bin_s"] / 2 for x in tl["t"]]
        ax[0].plot(t, [float("nan") if b is None else b for b in tl["balancedness"]], label=label)
        ax[1].plot(t, tl["tokens_per_s"], label=label)
    ax[0].set_ylabel("balancedness\n(mean / max busy time)")
    ax[0].set_ylim(0, 1.05)
    ax[1].set_ylabel("tokens/s completed")
    ax[1].set_xlabel("seconds")
    if shift_s:
        end = max(len(tl["t"]) * tl["bin_s"] for tl in timelines.values())
        for a in ax:
            for k in range(1, int(end // shift_s) + 1):
                a.axvline(k * shift_s, color="grey", linestyle=":", linewidth=0.8)
    ax[0].legend()
    ax[0].set_title(title)
    return _save(plt, fig, path)


def latency_percentiles(path: Path, series: dict[str, dict[str, float]], title: str) -> Path:
    """Grouped bars: latency percentiles (ms, log scale) per configuration."""
    plt = _plt()
    labels = list(series)
    keys = list(next(iter(series.values())))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        xs = [k + i * width for k in range(len(keys))]
        ax.bar(xs, [series[label][k] for k in keys], width, label=label)
    ax.set_xticks([k + width * (len(labels) - 1) / 2 for k in range(len(keys))], keys)
    ax.set_yscale("log")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)


def planner_balance_vs_moves(path: Path, drift: list[dict], title: str) -> Path:
    """Per drift case: weight copies (x) against mean balancedness (y), incremental vs from scratch."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5))
    for key_c, key_b, label, marker in (
        ("incremental_copies", "incremental_balancedness_mean", "incremental (ours)", "o"),
        ("scratch_copies", "scratch_balancedness_mean", "from scratch every step", "x"),
    ):
        ax.scatter([r[key_c] for r in drift], [r[key_b] for r in drift], label=label, marker=marker)
    for r in drift:
        ax.plot([r["incremental_copies"], r["scratch_copies"]],
                [r["incremental_balancedness_mean"], r["scratch_balancedness_mean"]], color="grey", linewidth=0.5)
        ax.annotate(f"E{r['experts']} G{r['gpus']} s{r['s']}", (r["incremental_copies"], r["incremental_balancedness_mean"]),
                    fontsize=6)
    ax.set_xscale("symlog")
    ax.set_xlabel("weight copies over the drift steps")
    ax.set_ylabel("mean balancedness (mean/max)")
    ax.set_title(title)
    ax.legend()
    return _save(plt, fig, path)
