"""Figures for the book: one matplotlib figure per function, returned to the caller to save and show."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

WD_COLOURS = {"with weight decay": "#1b7837", "without weight decay": "#b2182b"}

SPEARMAN_LIMITS = (-1.05, 1.05)
"""The y range of a Spearman axis: all of [−1, 1] with a margin, so that dots at ±1 are not cut."""


def _label_axes(ax, *, xlabel: str, ylabel: str, title: str, legend_loc: str | None = None) -> None:
    """The finish the book's line and dot charts share: axis labels, a 10-pt title, a 7-pt legend (``legend_loc``
    None: matplotlib's default place) and a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc=legend_loc)
    ax.grid(alpha=0.3)


def _dots_and_diagonal(
    ax, predicted, actual, *, lo: float, size: float, alpha: float, colour: str, diagonal_label: str | None = None
):
    """One dot per point (actual on x, predicted on y) and the dashed y = x line from ``lo`` to the largest value, on
    ``ax`` or, when it is None, on a new figure's axes; returns the axes."""
    if ax is None:
        _, ax = plt.subplots(figsize=(4.2, 3.8))
    ax.scatter(actual, predicted, s=size, alpha=alpha, color=colour)
    hi = float(max(np.max(actual), np.max(predicted)))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--", label=diagonal_label)
    return ax


def predicted_vs_actual(predicted: np.ndarray, actual: np.ndarray, *, title: str, ax=None):
    """Scatter of predicted against actual loss changes with the y = x line and the Spearman/Pearson."""
    from fragile.core.metrics import correlation

    lo = float(min(np.min(actual), np.min(predicted)))
    ax = _dots_and_diagonal(ax, predicted, actual, lo=lo, size=18, alpha=0.8, colour="#2166ac", diagonal_label="y = x")
    rho = correlation(predicted, actual, "spearman") if len(actual) >= 3 else float("nan")
    r = correlation(predicted, actual, "pearson") if len(actual) >= 3 else float("nan")
    ax.set_title(f"{title}\nSpearman {rho:.2f} · Pearson {r:.2f}", fontsize=9)
    ax.set_xlabel("actual Δ test loss (leave-one-out retraining)")
    ax.set_ylabel("predicted Δ test loss (influence)")
    ax.ticklabel_format(style="sci", scilimits=(-3, 3))
    return ax.figure


def param_change_norms(predicted: np.ndarray, actual: np.ndarray, *, title: str, ax=None):
    """The paper's Figure 1a–b: norm of the predicted vs the retrained parameter change, one dot per point."""
    ax = _dots_and_diagonal(ax, predicted, actual, lo=0, size=14, alpha=0.6, colour="#5e3c99")
    ax.set_xlabel("‖θ₋ᵢ − θ*‖ after retraining")
    ax.set_ylabel("‖predicted parameter change‖")
    ax.set_title(title, fontsize=9)
    return ax.figure


def sweep(table, *, x: str, y: str, ylabel: str, title: str, logy: bool = False, reference: dict[str, float] | None = None):
    """Mean ± standard deviation over seeds of ``y`` against ``x``, one line per weight-decay setting,
    with every seed as a faint dot; ``reference`` draws the paper's values as stars."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, colour in WD_COLOURS.items():
        sub = table[table["wd"] == label]
        if sub.empty:
            continue
        jitter = 0.08 if label.startswith("with ") else -0.08
        xs = sub[x].to_numpy(dtype=float)
        ax.scatter(xs * (1 + jitter / 10) if x == "width" else xs + jitter, sub[y], s=8, alpha=0.25, color=colour)
        stats = sub.groupby(x)[y].agg(["mean", "std"]).reset_index()
        ax.errorbar(stats[x], stats["mean"], yerr=stats["std"], color=colour, marker="o", capsize=3, label=label)
    if reference:
        for label, value in reference.items():
            ax.scatter(
                [table[x].min()],
                [value],
                marker="*",
                s=120,
                color=WD_COLOURS.get(label, "black"),
                edgecolor="black",
                zorder=5,
                label=f"paper, {label}",
            )
    if logy:
        ax.set_yscale("log")
    _label_axes(ax, xlabel=x, ylabel=ylabel, title=title, legend_loc="best")
    return fig


def correlation_vs_diagnostic(table, *, diagnostic: str, xlabel: str, title: str):
    """Spearman of every run against a convergence diagnostic (log scale), coloured by weight decay."""
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, colour in WD_COLOURS.items():
        sub = table[(table["wd"] == label) & (table[diagnostic] > 0)]
        ax.scatter(sub[diagnostic], sub["spearman"], s=14, alpha=0.6, color=colour, label=label)
    ax.set_xscale("log")
    _label_axes(ax, xlabel=xlabel, ylabel="Spearman (predicted vs actual)", title=title)
    return fig


BAND_STYLE = {"top": ("#2166ac", "o"), "band": ("#d6604d", "s")}


def correlation_per_test_point(table, *, band_names: dict[str, str], paper_range: tuple[float, float] | None = None, title: str):
    """Spearman per test point (x: rank of its test loss) and band, with the paper's range shaded."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    if paper_range is not None:
        ax.axhspan(*paper_range, color="#999999", alpha=0.2, label="paper's range (top band)")
    for band, name in band_names.items():
        sub = table[table["band"] == band]
        if sub.empty:
            continue
        colour, marker = BAND_STYLE.get(band, ("black", "o"))
        ax.plot(sub["test_point"], sub["spearman"], marker=marker, color=colour, ls="-", lw=0.8, label=name)
    ax.axhline(0, color="grey", lw=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(*SPEARMAN_LIMITS)
    _label_axes(
        ax,
        xlabel="test point (0 = highest test loss, last = median)",
        ylabel="Spearman (predicted vs actual)",
        title=title,
        legend_loc="lower left",
    )
    return fig


def hessian_spectrum(eigenvalues: np.ndarray, *, title: str, damping: float | None = None):
    """Every eigenvalue's magnitude, sorted, on a log axis; positive and negative ones in two colours."""
    ev = np.sort(np.asarray(eigenvalues, dtype=float))[::-1]
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    rank = np.arange(ev.size)
    for mask, colour, label in ((ev > 0, "#2166ac", "positive"), (ev < 0, "#b2182b", "negative (magnitude)")):
        if mask.any():
            ax.scatter(rank[mask], np.abs(ev[mask]), s=3, color=colour, label=f"{label}: {int(mask.sum())}")
    if damping:
        ax.axhline(damping, color="grey", ls="--", lw=0.8, label=f"damping λ = {damping:g}")
    ax.set_yscale("log")
    _label_axes(ax, xlabel="eigenvalue rank (largest first)", ylabel="|eigenvalue|", title=title)
    return fig


def correlation_vs_weight_decay(table, *, title: str):
    """Spearman of every test point (faint) and their mean (line) against weight decay; 0 on a linear stretch."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    positive = sorted(w for w in table["weight_decay"].unique() if w > 0)
    ax.scatter(table["weight_decay"], table["spearman"], s=14, alpha=0.35, color="#2166ac", label="one test point")
    stats = table.groupby("weight_decay")["spearman"].agg(["mean", "std"]).reset_index()
    ax.errorbar(
        stats["weight_decay"],
        stats["mean"],
        yerr=stats["std"],
        color="#053061",
        marker="o",
        capsize=3,
        label="mean ± std over test points",
    )
    if positive:
        ax.set_xscale("symlog", linthresh=positive[0])
    ax.axvline(0.01, color="grey", ls=":", lw=0.8)
    ax.set_ylim(*SPEARMAN_LIMITS)
    _label_axes(ax, xlabel="weight decay", ylabel="Spearman, top band", title=title, legend_loc="lower left")
    return fig


def test_point_panel(
    *,
    predicted: np.ndarray,
    actual: np.ndarray,
    scatter_title: str,
    test_image: np.ndarray,
    test_caption: str,
    helpful: list[tuple[np.ndarray, str]],
    harmful: list[tuple[np.ndarray, str]],
):
    """One test point: the predicted-vs-actual scatter, the test image, and the training images whose removal
    is predicted to raise (helpful) and to lower (harmful) its loss the most, each with a caption."""
    cols = max(len(helpful), len(harmful), 1)
    fig = plt.figure(figsize=(5.4 + 1.1 * cols, 4.0))
    grid = fig.add_gridspec(2, cols + 4, width_ratios=[3.6, 0.2, 1.0, 0.25] + [1.0] * cols)
    predicted_vs_actual(predicted, actual, title=scatter_title, ax=fig.add_subplot(grid[:, 0]))

    def thumbnail(ax, image, caption):
        ax.imshow(np.asarray(image).squeeze(), cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(caption, fontsize=6.5)

    test_ax = fig.add_subplot(grid[0, 2])
    thumbnail(test_ax, test_image, test_caption)
    for side in ("left", "right", "top", "bottom"):
        test_ax.spines[side].set_color("#d6604d")
        test_ax.spines[side].set_linewidth(2)
    for row, (items, name) in enumerate(((helpful, "helpful"), (harmful, "harmful"))):
        for c, (image, caption) in enumerate(items):
            ax = fig.add_subplot(grid[row, c + 4])
            thumbnail(ax, image, caption)
            if c == 0:
                ax.set_ylabel(f"most {name}", fontsize=8)
    fig.subplots_adjust(wspace=0.3, hspace=0.5)
    return fig


def to_png(fig, dpi: int = 110) -> bytes:
    """A figure as PNG bytes (for kernel-free widget panels); closes the figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save(fig, path, dpi: int = 130) -> None:
    """Save a figure for the book's figure files."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")


REGENERATE = "Regenerate this figure:"


def regenerate_command(path: str | Path) -> str | None:
    """The command that regenerates the figure a chapter saves at ``<results_dir>/<section>/<profile>/figures/<file>``
    (``fragile run <section> --profile <profile>``: a book chapter's parameters are its profile's, nothing else) and
    where that run writes it; None for a path of another shape."""
    parts = Path(path).parts
    if len(parts) < 4 or parts[-2] != "figures":
        return None
    section, profile, name = parts[-4], parts[-3], parts[-1]
    return f"`fragile run {section} --profile {profile}` (it writes `runs/results/{section}/{profile}/figures/{name}`)"


def show(fig, path) -> None:
    """Save ``fig`` to ``path``, display it once in the notebook with the command that regenerates it under it
    (:func:`regenerate_command`), and close it (no duplicate output)."""
    from IPython.display import Markdown, display

    save(fig, path)
    display(fig)
    plt.close(fig)
    command = regenerate_command(path)
    if command:
        display(Markdown(f"<small>{REGENERATE} {command}</small>"))
