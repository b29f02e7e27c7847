"""Plots: the training curves of a run (pakar.report) and the expert-load heatmap (`pakar eval --plot`).

The one home of matplotlib in pakar. Choices:
- matplotlib is the optional `plot` extra, imported lazily inside the drawing functions: a missing
  matplotlib costs nothing until a plot is asked for, and then MissingMatplotlib says how to install it
  (the training loop and `pakar report` say so once and write report.md without images; `pakar eval
  --plot` stops with that line).
- The object-oriented API (matplotlib.figure.Figure, saved through the Agg canvas), never pyplot:
  no global figure state and no backend choice, so drawing needs no display and leaves the caller's
  matplotlib setup alone.
- A PNG is written to a temporary name in its folder and renamed over the old one (os.replace), so
  an image viewer refreshing during training never reads half a file; the temporary name follows
  pakar.checkpoint's ".NAME.tmp<pid>" pattern, which a new run in the folder cleans up.
- Functions take plain lists (steps and values), not pakar records: pakar.report decides what to draw.
"""

from __future__ import annotations

import os
from pathlib import Path

from pakar import PakarError

PLOT_HINT = "pip install matplotlib (or pip install 'pakar[plot]')"


class MissingMatplotlib(PakarError):
    """matplotlib is not installed."""


def _figure(width: float, height: float, panels: int = 1):
    """A new Figure and its axes (a list when panels > 1)."""
    try:
        from matplotlib.figure import Figure  # lazy: the optional plot extra
    except ImportError:
        raise MissingMatplotlib(f"plots need matplotlib: {PLOT_HINT}") from None
    fig = Figure(figsize=(width, height), layout="constrained")  # laid out while drawing: one pass
    axes = fig.subplots(1, panels) if panels > 1 else fig.subplots()
    return fig, axes


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _smooth(values: list[float], span: int) -> list[float]:
    """Exponential moving average (bias-corrected, like TensorBoard's smoothing) over about `span` points."""
    alpha, avg, out = 2 / (span + 1), 0.0, []
    for i, v in enumerate(values):
        avg = alpha * v + (1 - alpha) * avg
        out.append(avg / (1 - (1 - alpha) ** (i + 1)))
    return out


def plot_loss(path: Path, train_steps, train_loss, val_steps, val_loss, title: str) -> Path:
    """Training loss per optimizer step (raw and smoothed) with the validation loss, in nats per token."""
    fig, ax = _figure(7, 4)
    if train_steps:
        ax.plot(train_steps, train_loss, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (each step)")
        if len(train_steps) >= 10:
            ax.plot(train_steps, _smooth(train_loss, max(5, len(train_steps) // 50)), color="tab:blue",
                    linewidth=1.5, label="train (smoothed)")
    if val_steps:
        ax.plot(val_steps, val_loss, "o-", color="tab:red", markersize=4, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_validation(path: Path, steps, bpb, loss, title: str) -> Path:
    """Validation bits per byte (left, comparable across tokenizers) and loss in nats per token (right)."""
    fig, (a, b) = _figure(9, 3.6, panels=2)
    pairs = [(s, v) for s, v in zip(steps, bpb) if v is not None]
    if pairs:
        a.plot(*zip(*pairs), "o-", color="tab:green", markersize=4)
    a.set_title("validation bits per byte", fontsize=9)
    a.set_ylabel("bits per byte")
    b.plot(steps, loss, "o-", color="tab:red", markersize=4)
    b.set_title("validation loss", fontsize=9)
    b.set_ylabel("nats per token")
    for ax in (a, b):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_series(path: Path, steps, values, ylabel: str, title: str, color: str = "tab:purple",
                sci: bool = True) -> Path:
    """One quantity per optimizer step (learning rate, tokens per second)."""
    fig, ax = _figure(7, 3.2)
    ax.plot(steps, values, color=color, linewidth=1.2, marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci" if sci else "plain", scilimits=(-3, 4), useOffset=False)
    return _save(fig, path)


def plot_expert_load(path: Path, train_steps, train_imbalance, val_steps, val_imbalance, fraction,
                     title: str) -> Path:
    """Left: max/mean expert load of the worst layer over training (1 = even); right: the share of routed
    tokens per layer and expert at the last validation (`fraction`, L lists of E)."""
    fig, (a, b) = _figure(11, max(3.6, 0.3 * len(fraction) + 2), panels=2)
    if train_steps:
        a.plot(train_steps, train_imbalance, color="tab:orange", linewidth=1, label="training steps")
    if val_steps:
        a.plot(val_steps, val_imbalance, "o-", color="tab:red", markersize=4, label="validation")
    a.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    a.set_xlabel("optimizer step")
    a.set_ylabel("max / mean tokens per expert (worst layer)")
    a.set_title("expert load imbalance (1 = perfectly even)", fontsize=9)
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    _heatmap(fig, b, fraction, "last validation")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _heatmap(fig, ax, fraction, title: str) -> None:
    import numpy as np  # lazy: with matplotlib, which needs it anyway

    frac = np.asarray(fraction, dtype=float) * 100
    L, E = frac.shape
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
    if L * E <= 400:  # small enough to print every share in its cell
        for (layer, e), v in np.ndenumerate(frac):
            ax.text(e, layer, f"{v:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if v < frac.max() * 0.6 else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(E))
    ax.set_yticks(range(L))
    ax.set_title(f"{title}\nexpert load, % of routed tokens (balanced: {100 / E:.1f}% each)", fontsize=9)
    fig.colorbar(im, ax=ax, label="%")


def plot_experts(res: dict, path: Path, title: str) -> Path:
    """`pakar eval --plot`: the expert load per layer of one evaluation (res["expert_fraction"])."""
    if not res["expert_fraction"] or not res["expert_fraction"][0]:
        raise PakarError("--plot draws the expert load per layer, and a dense model has no experts")
    L, E = len(res["expert_fraction"]), len(res["expert_fraction"][0])
    fig, ax = _figure(max(6.0, 0.5 * E + 2.5), max(3.0, 0.35 * L + 1.8))
    _heatmap(fig, ax, res["expert_fraction"], title)
    return _save(fig, path)
