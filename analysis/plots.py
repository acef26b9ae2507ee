"""The analysis plots (PNG, matplotlib/seaborn); each function writes one file.

Figures are made with matplotlib's object API (``Figure``), not pyplot: no
backend is chosen, no global figure state is kept, and importing this module
changes nothing in the process (files only; no display on workers or CI).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from sklearn import metrics as skm

_DPI = 110


def _save(fig: Any, out_dir: str, name: str) -> str:
    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def history(history_csv: str, out_dir: str) -> str | None:
    """Loss and AUC per epoch, training vs validation."""
    frame = pd.read_csv(history_csv)
    if frame.empty:
        return None
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "auc"), strict=True):
        for prefix, name in (("", "training"), ("val_", "validation")):
            if prefix + metric in frame:
                ax.plot(frame["epoch"] + 1, frame[prefix + metric], marker="o", label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric.upper() if metric == "auc" else metric)
        ax.set_title(f"Training history: {metric}")
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(fig, out_dir, "history.png")


def roc(
    labels: np.ndarray,
    scores: np.ndarray,
    auc: float,
    band: dict | None,
    ci: list | None,
    threshold_point: tuple[float, float] | None,
    out_dir: str,
) -> str:
    """ROC curve with AUC, its 95% CI and the bootstrap band."""
    fpr, tpr, _ = skm.roc_curve(labels, scores)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    label = f"AUC {auc:.3f}" + (f" (95% CI {ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
    ax.plot(fpr, tpr, lw=2, label=label)
    if band:
        ax.fill_between(
            band["fpr"], band["tpr_low"], band["tpr_high"], alpha=0.25, label="95% bootstrap band"
        )
    if threshold_point:
        ax.plot(*threshold_point, "o", color="black", label="chosen threshold")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(
        xlabel="False positive rate (1 − specificity)",
        ylabel="True positive rate (sensitivity)",
        title="ROC curve",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower right")
    return _save(fig, out_dir, "roc.png")


def precision_recall(labels: np.ndarray, scores: np.ndarray, ap: float, out_dir: str) -> str:
    """Precision–recall curve with average precision and the prevalence baseline."""
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.plot(recall, precision, lw=2, label=f"AP {ap:.3f}")
    ax.axhline(labels.mean(), ls="--", color="grey", label=f"prevalence {labels.mean():.2f}")
    ax.set(
        xlabel="Recall (sensitivity)",
        ylabel="Precision (PPV)",
        title="Precision–recall",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower left")
    return _save(fig, out_dir, "precision_recall.png")


def confusion(matrix: dict[str, int], threshold: float, out_dir: str) -> str:
    """Confusion matrix heatmap: counts and row rates."""
    counts = np.array([[matrix["tn"], matrix["fp"]], [matrix["fn"], matrix["tp"]]])
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    text = np.array(
        [
            [f"{c}\n{r:.1%}" for c, r in zip(cr, rr, strict=True)]
            for cr, rr in zip(counts, rates, strict=True)
        ]
    )
    fig = Figure(figsize=(5, 4.3))
    ax = fig.subplots()
    sns.heatmap(
        rates,
        annot=text,
        fmt="",
        cmap="Blues",
        vmin=0,
        vmax=1,
        cbar=True,
        ax=ax,
        xticklabels=["normal", "abnormal"],
        yticklabels=["normal", "abnormal"],
    )
    ax.set(xlabel="Predicted", ylabel="True", title=f"Confusion matrix (threshold {threshold:.3f})")
    return _save(fig, out_dir, "confusion_matrix.png")


def reliability(curve: list[dict], ece: float, brier: float, out_dir: str) -> str:
    """Reliability diagram: observed rate vs mean score per bin, bin sizes below."""
    fig = Figure(figsize=(5.5, 6))
    (ax, bx) = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    means = [b["mean_score"] for b in curve]
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.plot(
        means, [b["observed_rate"] for b in curve], "o-", label=f"ECE {ece:.3f}, Brier {brier:.3f}"
    )
    ax.set(ylabel="Observed abnormal rate", title="Reliability diagram", ylim=(0, 1))
    ax.legend(loc="upper left")
    bx.bar(means, [b["n"] for b in curve], width=0.08, color="grey")
    bx.set(xlabel="Mean predicted score", ylabel="images", xlim=(0, 1))
    return _save(fig, out_dir, "reliability.png")


def score_distributions(frame: pd.DataFrame, threshold: float, out_dir: str) -> str:
    """Histogram of scores for normal and abnormal cases."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    shown = frame.assign(truth=frame["label"].map({0: "normal", 1: "abnormal"}))
    sns.histplot(
        shown,
        x="score",
        hue="truth",
        bins=30,
        stat="density",
        common_norm=False,
        element="step",
        ax=ax,
        binrange=(0, 1),
    )
    ax.axvline(threshold, color="black", ls="--", label="threshold")
    ax.set(
        xlabel="Predicted probability of abnormal",
        ylabel="density",
        title="Score distribution by true label",
    )
    return _save(fig, out_dir, "score_distributions.png")


def forest_limits(values: list[float]) -> tuple[float, float]:
    """The AUC axis of a forest plot: every value inside, with a margin beyond each end.

    The margin (5% of the span, at least 0.01) keeps a whisker that ends at
    1.0, and its cap, clear of the plot's edge.
    """
    margin = 0.05 * max(max(values) - min(values), 0.2)
    return max(min(values) - margin, -0.02), min(max(values) + margin, 1.02)


def subgroup_forest(rows: list[dict], overall: float, out_dir: str) -> str | None:
    """AUC with 95% CI per subgroup.

    Whiskers end in caps and the x axis reaches past every interval (an AUC
    interval often ends at 1.0), so no whisker is cut at the plot's edge.
    """
    shown = [r for r in rows if r["roc_auc"] is not None]
    if not shown:
        return None
    fig = Figure(figsize=(6.5, 0.4 * len(shown) + 1.5))
    ax = fig.subplots()
    y = np.arange(len(shown))[::-1]
    ends = [overall, 0.5]
    for yi, row in zip(y, shown, strict=True):
        ci = row.get("roc_auc_ci95")
        auc = row["roc_auc"]
        if ci:
            ax.errorbar(
                auc,
                yi,
                xerr=[[auc - ci[0]], [ci[1] - auc]],
                fmt="s",
                color="tab:blue",
                lw=2,
                capsize=4,
                clip_on=False,
            )
            ends.extend(ci)
        else:
            ax.plot(auc, yi, "s", color="tab:blue", clip_on=False)
        ends.append(auc)
    ax.axvline(overall, color="grey", ls="--", label=f"overall {overall:.3f}")
    ax.axvline(0.5, color="lightgrey", ls=":", label="chance (0.5)")
    ax.set_yticks(y, [f"{r['attribute']}={r['value']} (n={r['n']})" for r in shown])
    ax.set(
        xlabel="ROC AUC (95% CI)",
        title="AUC by subgroup",
        xlim=forest_limits(ends),
        ylim=(-0.7, len(shown) - 0.3),
    )
    ax.legend(loc="lower left")
    return _save(fig, out_dir, "subgroup_auc.png")
