"""PNG plots of a schedule (LR and batch size vs tokens), of a run's losses, and of the final eval
losses of several runs/exports side by side (anneal-compare).

Uses matplotlib's object API with the Agg canvas directly (no pyplot), so it never touches the
global backend or needs a display, and is safe to call from a training process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from anneal.train.batch_ramp import BatchRamp
from anneal.train.schedule import Schedule, format_tokens

__all__ = ["plot_comparison", "plot_losses", "plot_schedule"]

_TOKENS_FMT = FuncFormatter(lambda x, _pos: format_tokens(x) if x else "0")


def _new_figure(nrows: int, height: float) -> tuple[Figure, Any]:
    fig = Figure(figsize=(9, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    return path


def _stage_lines(axes: Iterable[Any], schedule: Schedule) -> None:
    """Dashed vertical line at the start of each stage, its name written along the line."""
    axes = list(axes)
    crowd, last_x = 0, None  # labels of stages that start close together are shifted sideways
    for name in schedule.stage_names:
        x = schedule.stage_start(name)
        crowd = crowd + 1 if last_x is not None and x - last_x < 0.02 * schedule.total_tokens else 0
        last_x = x
        for k, ax in enumerate(axes):
            if x > 0:
                ax.axvline(x, color="0.5", linestyle="--", linewidth=0.8)
            if k == 0:
                ax.annotate(name, xy=(x, 1.0), xycoords=("data", "axes fraction"), xytext=(3 + 10 * crowd, -3),
                            textcoords="offset points", rotation=90, va="top", ha="left",
                            fontsize=8, color="0.3")
    for ax in axes:
        ax.axvline(schedule.total_tokens, color="0.5", linestyle=":", linewidth=0.8)


def plot_schedule(schedule: Schedule, ramp: BatchRamp | None, path: str | os.PathLike,
                  title: str | None = None, points_per_stage: int = 200) -> Path:
    """Write a PNG: LR vs tokens (top) and batch size vs tokens (bottom, if ``ramp`` given).

    Each stage is drawn from its start to its end LR, so a deliberate jump at a boundary
    (an explicit ``lr_start``) shows as a gap, not as a slope. Returns the path written.
    """
    fig, axes = _new_figure(2 if ramp is not None else 1, 6.0 if ramp is not None else 3.5)
    ax_lr = axes[0]
    for i, name in enumerate(schedule.stage_names):
        start, end = schedule.stage_start(name), schedule.stage_end(name)
        n = max(2, points_per_stage)
        xs = [start + (end - start) * j / (n - 1) for j in range(n)]
        ys = [schedule.stage_lr(i, j / (n - 1)) for j in range(n)]
        ax_lr.plot(xs, ys, color="C0", linewidth=1.6)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_ylim(bottom=0)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.grid(alpha=0.3)

    if ramp is not None:
        ax_b = axes[1]
        end = max(schedule.total_tokens, ramp.points[-1][0])
        xs = [f for f, _ in ramp.points] + [end]
        ys = [b for _, b in ramp.points] + [ramp.points[-1][1]]
        ax_b.step(xs, ys, where="post", color="C1", linewidth=1.6)
        ax_b.set_ylabel("batch (tokens)")
        ax_b.yaxis.set_major_formatter(_TOKENS_FMT)
        ax_b.set_ylim(bottom=0, top=max(ys) * 1.15)
        ax_b.grid(alpha=0.3)

    _stage_lines(axes, schedule)
    axes[-1].set_xlabel("tokens")
    axes[-1].xaxis.set_major_formatter(_TOKENS_FMT)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _as_float(v: Any) -> float | None:
    if v is None:
        return None
    try:
        f = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def plot_losses(history: list[Mapping[str, Any]], path: str | os.PathLike, title: str | None = None,
                schedule: Schedule | None = None) -> Path:
    """Write a PNG of train loss (``loss``) and eval losses (``eval_loss``, ``eval_loss/<source>``)
    vs ``tokens``. Rows lacking a key (eval runs every N steps) or with a non-finite value are
    skipped for that series; rows without ``tokens`` are skipped. Optional ``schedule`` draws
    stage boundaries. An empty history still writes a PNG (saying so), so end-of-run reporting
    never fails. Returns the path written.
    """
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in history:
        x = _as_float(row.get("tokens"))
        if x is None:
            continue
        for key, value in row.items():
            if key == "loss" or key == "eval_loss" or key.startswith("eval_loss/"):
                y = _as_float(value)
                if y is not None:
                    xs, ys = series.setdefault(key, ([], []))
                    xs.append(x)
                    ys.append(y)

    fig, axes = _new_figure(1, 4.5)
    ax = axes[0]
    if "loss" in series:
        xs, ys = series["loss"]
        ax.plot(xs, ys, color="0.55", linewidth=0.9, label="train loss")
    evals = sorted(k for k in series if k != "loss")  # eval_loss first, then per source
    for k, key in enumerate(evals):
        xs, ys = series[key]
        label = "eval loss" if key == "eval_loss" else f"eval {key.split('/', 1)[1]}"
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.3, color=f"C{k}", label=label)
    if not series:
        ax.text(0.5, 0.5, "no loss data yet", transform=ax.transAxes, ha="center", va="center", color="0.4")
    else:
        ax.legend(fontsize=8, loc="upper right")
    if schedule is not None:
        _stage_lines(axes, schedule)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss")
    ax.xaxis.set_major_formatter(_TOKENS_FMT)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_comparison(names: list[str], columns: Mapping[str, list[float | None]], path: str | os.PathLike,
                    title: str = "held-out eval loss", scores: Mapping[str, list[float | None]] | None = None) -> Path:
    """Write a PNG of grouped bars: one group per column (e.g. ``eval_loss`` and each source), one
    bar per name (run, export, soup), its value written on top. None draws no bar. The y axis
    starts near the smallest value so that small differences between branches are visible.
    `scores` (benchmark columns, higher is better) go in a second panel below."""
    panels = [(columns, "loss", title)] + ([(scores, "score (higher is better)", "benchmarks")] if scores else [])
    n_cols = max(len(c) for c, _, _ in panels)
    fig = Figure(figsize=(max(6.0, 1.2 + 0.45 * len(names) * n_cols), 4.5 * len(panels)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (cols, ylabel, panel_title) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        _bars(ax, names, cols, ylabel, panel_title)
    return _save(fig, path)


def _bars(ax, names: list[str], columns: Mapping[str, list[float | None]], ylabel: str, title: str) -> None:
    width = 0.8 / max(1, len(names))
    values = [v for vs in columns.values() for v in vs if v is not None]
    for i, name in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g, vs in enumerate(columns.values()) if vs[i] is not None]
        ys = [vs[i] for vs in columns.values() if vs[i] is not None]
        bars = ax.bar(xs, ys, width, label=name, color=f"C{i % 10}")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(columns)), list(columns))
    if values:
        lo, hi = min(values), max(values)
        pad = max(hi - lo, 1e-3)
        ax.set_ylim(lo - pad, hi + 0.8 * pad)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title)


def plot_expert_load(load, layers: list, path: str | os.PathLike, title: str = "") -> Path:
    """Heatmap of routed tokens per expert (columns) and MoE layer (rows), each row as a share of
    its layer's mean: 1.0 is a perfectly balanced expert."""
    import numpy as np

    share = np.asarray(load, dtype=float)
    share = share / np.maximum(share.mean(axis=1, keepdims=True), 1e-9)
    fig = Figure(figsize=(max(6.0, share.shape[1] * 0.08 + 2), max(2.5, len(layers) * 0.25 + 1.2)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    img = ax.imshow(share, aspect="auto", cmap="magma", vmin=0.0, vmax=max(2.0, float(share.max())),
                    interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_title(title or "expert load / layer mean")
    fig.colorbar(img, ax=ax, label="load / mean")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
