"""Classification metrics, thresholds, calibration, clustered bootstrap, subgroups.

Point metrics come from scikit-learn. Confidence intervals resample
*patients* (all of a patient's images move together): images of one patient
are correlated, and resampling images would make intervals too narrow.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pandas as pd
from sklearn import metrics as skm

AGE_BANDS = (
    (0, 18, "<18"),
    (18, 40, "18-39"),
    (40, 60, "40-59"),
    (60, 80, "60-79"),
    (80, 200, "80+"),
)


def parse_threshold_rule(text: str) -> tuple[str, float | None]:
    """``youden`` | a number in [0,1] | ``sens=0.9`` | ``spec=0.9`` | ``ppv=0.8``.

    Raises:
        ValueError: for anything else.
    """
    text = text.strip().lower()
    if text == "youden":
        return "youden", None
    match = re.fullmatch(r"(sens|spec|ppv)=(0?\.\d+|1(\.0*)?)", text)
    if match:
        return match.group(1), float(match.group(2))
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if 0.0 <= value <= 1.0:
        return "fixed", value
    raise ValueError(
        f"threshold must be youden, a number in [0,1], sens=X, spec=X or ppv=X; got {text!r}"
    )


def choose_threshold(
    labels: np.ndarray, scores: np.ndarray, rule: tuple[str, float | None]
) -> float:
    """The score threshold (predict abnormal when score >= threshold) under a rule."""
    kind, value = rule
    if kind == "fixed":
        return float(value)  # type: ignore[arg-type]
    if len(np.unique(labels)) < 2:
        raise ValueError("choosing a threshold needs both classes")
    fpr, tpr, thresholds = skm.roc_curve(labels, scores)
    finite = np.isfinite(thresholds)
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if kind == "youden":
        return float(thresholds[np.argmax(tpr - fpr)])
    if kind == "sens":
        # Highest threshold that still reaches the sensitivity (best specificity).
        return float(thresholds[np.flatnonzero(tpr >= value)[0]])
    if kind == "ppv":
        # Lowest threshold whose positive predictive value reaches the target
        # (best sensitivity); the highest score when none does.
        precision, _, cuts = skm.precision_recall_curve(labels, scores)
        reaching = np.flatnonzero(precision[:-1] >= value)
        return float(cuts[reaching[0]] if reaching.size else cuts[-1])
    # spec: lowest threshold that keeps the specificity (best sensitivity).
    return float(thresholds[np.flatnonzero(1 - fpr >= value)[-1]])


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion matrix and the rates derived from it."""
    predicted = (scores >= threshold).astype(int)
    tn, fp, fn, tp = (
        int(v) for v in skm.confusion_matrix(labels, predicted, labels=[0, 1]).ravel()
    )

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": threshold,
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "accuracy": skm.accuracy_score(labels, predicted),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": skm.f1_score(labels, predicted, zero_division=0.0),
    }


def calibration(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Brier score, expected calibration error and the reliability curve (equal-width bins)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        mean_score, observed = float(scores[inside].mean()), float(labels[inside].mean())
        ece += inside.sum() / len(scores) * abs(observed - mean_score)
        curve.append(
            {"bin": b, "n": int(inside.sum()), "mean_score": mean_score, "observed_rate": observed}
        )
    return {
        "brier": float(skm.brier_score_loss(labels, scores)),
        "ece": float(ece),
        "bins": bins,
        "reliability": curve,
    }


def _auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float | None:
    if len(np.unique(labels if weights is None else labels[weights > 0])) < 2:
        return None
    return float(skm.roc_auc_score(labels, scores, sample_weight=weights))


def bootstrap(
    frame: pd.DataFrame,
    threshold: float,
    replicates: int,
    seed: int,
    roc_grid: np.ndarray | None = None,
) -> dict[str, Any]:
    """95% intervals by resampling patients with replacement.

    Each replicate draws as many patients as there are, and weighs every
    image by how often its patient was drawn (the same as copying them).

    Returns:
        ``{metric: [low, high]}`` for AUC, average precision, sensitivity,
        specificity, and the ROC band (TPR percentiles on ``roc_grid``).
    """
    if replicates <= 0:
        return {}
    rng = np.random.default_rng(seed)
    patients, index = np.unique(frame["patient_id"].astype(str).to_numpy(), return_inverse=True)
    labels = frame["label"].to_numpy().astype(int)
    scores = frame["score"].to_numpy().astype(float)
    predicted = scores >= threshold
    grid = np.linspace(0, 1, 101) if roc_grid is None else roc_grid
    draws: dict[str, list[float]] = {
        "auc": [],
        "average_precision": [],
        "sensitivity": [],
        "specificity": [],
    }
    tprs = []
    for _ in range(replicates):
        counts = rng.multinomial(len(patients), np.full(len(patients), 1.0 / len(patients)))
        weights = counts[index].astype(float)
        auc = _auc(labels, scores, weights)
        if auc is None:
            continue
        draws["auc"].append(auc)
        draws["average_precision"].append(
            float(skm.average_precision_score(labels, scores, sample_weight=weights))
        )
        positives, negatives = weights * (labels == 1), weights * (labels == 0)
        draws["sensitivity"].append(float((positives * predicted).sum() / positives.sum()))
        draws["specificity"].append(float((negatives * ~predicted).sum() / negatives.sum()))
        fpr, tpr, _ = skm.roc_curve(labels, scores, sample_weight=weights)
        tprs.append(np.interp(grid, fpr, tpr))
    out: dict[str, Any] = {
        name: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if v else None
        for name, v in draws.items()
    }
    out["replicates_used"] = len(draws["auc"])
    if tprs:
        stacked = np.stack(tprs)
        out["roc_band"] = {
            "fpr": grid.tolist(),
            "tpr_low": np.percentile(stacked, 2.5, axis=0).tolist(),
            "tpr_high": np.percentile(stacked, 97.5, axis=0).tolist(),
        }
    return out


def summarize(
    frame: pd.DataFrame, threshold: float, replicates: int = 0, seed: int = 0
) -> dict[str, Any]:
    """All headline metrics of one labelled set of predictions."""
    labels = frame["label"].to_numpy().astype(int)
    scores = frame["score"].to_numpy().astype(float)
    result: dict[str, Any] = {
        "n": int(len(frame)),
        "patients": int(frame["patient_id"].nunique()),
        "positives": int(labels.sum()),
        "prevalence": float(labels.mean()) if len(labels) else None,
        "roc_auc": _auc(labels, scores),
        "average_precision": (
            float(skm.average_precision_score(labels, scores)) if labels.any() else None
        ),
    }
    result.update(at_threshold(labels, scores, threshold))
    result["calibration"] = calibration(labels, scores)
    result["ci95"] = bootstrap(frame, threshold, replicates, seed)
    return result


def aggregate(frame: pd.DataFrame, level: str, how: str = "max") -> pd.DataFrame:
    """Image-level rows -> one row per study or patient (score: max or mean; label: any)."""
    if level == "image":
        return frame
    keys = {"study": ["patient_id", "study_id"], "patient": ["patient_id"]}[level]
    work = frame.copy()
    work["study_id"] = work["study_id"].fillna("")
    first = [c for c in work.columns if c not in (*keys, "score", "label", "dicom_path")]
    grouped = work.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(
        score=("score", how),
        label=("label", "max"),
        **{c: (c, "first") for c in first if c in work},
        dicom_path=("dicom_path", "first"),
    ).reset_index()
    return out


def age_band(age: Any) -> str:
    """The subgroup band of an age in years ("unknown" when missing)."""
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return "unknown"
    for low, high, name in AGE_BANDS:
        if low <= age < high:
            return name
    return "unknown"


MAX_SUBGROUP_VALUES = 20


def subgroups(
    frame: pd.DataFrame,
    threshold: float,
    replicates: int,
    seed: int,
    extra: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Per subgroup: n, prevalence, AUC with CI, sensitivity and specificity.

    Attributes: sex, age band, view position, and any extra column with at
    most MAX_SUBGROUP_VALUES distinct values (site, scanner, …; columns
    with more, like free text or ids, are skipped).
    """
    extra = [c for c in (extra or []) if c in frame and frame[c].nunique() <= MAX_SUBGROUP_VALUES]
    work = frame.assign(
        age_band=frame["age"].map(age_band),
        sex=frame["sex"].fillna("unknown"),
        view_position=frame["view_position"].fillna("unknown"),
        **{c: frame[c].fillna("unknown") for c in extra},
    )
    rows = []
    for column in ("sex", "age_band", "view_position", *extra):
        for value, part in work.groupby(column, sort=True):
            labels = part["label"].to_numpy().astype(int)
            scores = part["score"].to_numpy().astype(float)
            stats = at_threshold(labels, scores, threshold)
            ci = bootstrap(part, threshold, replicates, seed) if replicates else {}
            rows.append(
                {
                    "attribute": column,
                    "value": str(value),
                    "n": int(len(part)),
                    "prevalence": float(labels.mean()),
                    "roc_auc": _auc(labels, scores),
                    "roc_auc_ci95": ci.get("auc"),
                    "sensitivity": stats["sensitivity"],
                    "specificity": stats["specificity"],
                }
            )
    return rows


def leakage(frame: pd.DataFrame) -> dict[str, Any]:
    """Patients that appear in more than one split of the predictions."""
    if "split" not in frame or frame["split"].isna().all():
        return {"checked": False, "patients_in_several_splits": 0}
    splits_per_patient = frame.dropna(subset=["split"]).groupby("patient_id")["split"].nunique()
    leaked = int((splits_per_patient > 1).sum())
    return {"checked": True, "patients_in_several_splits": leaked}
