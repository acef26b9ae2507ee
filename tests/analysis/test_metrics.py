"""analysis.metrics against known answers and scikit-learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from analysis import metrics as m


def _frame(labels, scores, patients=None, split="test") -> pd.DataFrame:
    n = len(labels)
    return pd.DataFrame(
        {
            "dicom_path": [f"f{i}" for i in range(n)],
            "patient_id": patients if patients is not None else [f"p{i}" for i in range(n)],
            "study_id": ["s"] * n,
            "view_position": ["PA"] * n,
            "age": [50] * n,
            "sex": ["F"] * n,
            "split": [split] * n,
            "label": labels,
            "score": scores,
            "model_id": ["m"] * n,
        }
    )


def test_known_confusion_matrix_and_auc() -> None:
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.4, 0.8, 0.9])
    result = m.summarize(_frame(labels, scores), threshold=0.5)
    # 15 of the 16 positive-negative pairs are ordered right.
    assert result["roc_auc"] == pytest.approx(15 / 16, abs=1e-12)
    assert result["confusion_matrix"] == {"tn": 3, "fp": 1, "fn": 1, "tp": 3}
    assert (result["sensitivity"], result["specificity"]) == (0.75, 0.75)
    assert (result["ppv"], result["npv"]) == (0.75, 0.75)


def test_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1)
    result = m.summarize(_frame(labels, scores), threshold=0.45)
    assert result["roc_auc"] == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
    assert result["average_precision"] == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-9
    )
    assert result["f1"] == pytest.approx(skm.f1_score(labels, scores >= 0.45), abs=1e-9)
    assert result["calibration"]["brier"] == pytest.approx(
        skm.brier_score_loss(labels, scores), abs=1e-9
    )


def test_threshold_rules() -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 400)
    scores = rng.normal(labels * 1.0, 1.0)
    youden = m.choose_threshold(labels, scores, m.parse_threshold_rule("youden"))
    fpr, tpr, thresholds = skm.roc_curve(labels, scores)
    assert youden == thresholds[np.argmax(tpr - fpr)]
    sens = m.choose_threshold(labels, scores, m.parse_threshold_rule("sens=0.9"))
    assert m.at_threshold(labels, scores, sens)["sensitivity"] >= 0.9
    spec = m.choose_threshold(labels, scores, m.parse_threshold_rule("spec=0.8"))
    assert m.at_threshold(labels, scores, spec)["specificity"] >= 0.8
    assert m.parse_threshold_rule("0.5") == ("fixed", 0.5)
    for bad in ("2", "sens=1.5", "median"):
        with pytest.raises(ValueError):
            m.parse_threshold_rule(bad)


def test_bootstrap_covers_true_auc_at_about_nominal_rate() -> None:
    # Binormal scores: the true AUC is Phi(d / sqrt(2)).
    from scipy.stats import norm

    d = 1.0
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(2)
    covered, draws = 0, 40
    for i in range(draws):
        labels = rng.integers(0, 2, 150)
        scores = rng.normal(d * labels, 1.0)
        ci = m.bootstrap(_frame(labels, scores), 0.5, replicates=150, seed=i)["auc"]
        covered += ci[0] <= true_auc <= ci[1]
    assert 0.82 <= covered / draws <= 1.0


def test_patient_clustering_widens_the_interval() -> None:
    rng = np.random.default_rng(3)
    patients = [f"p{i}" for i in range(60)]
    labels, scores, owners = [], [], []
    for patient in patients:
        label = int(rng.integers(0, 2))
        base = rng.normal(label * 0.8, 1.0)
        for _ in range(8):  # 8 strongly correlated images per patient
            labels.append(label)
            scores.append(base + rng.normal(0, 0.05))
            owners.append(patient)
    frame = _frame(np.array(labels), np.array(scores), owners)
    clustered = m.bootstrap(frame, 0.5, 300, 0)["auc"]
    naive = m.bootstrap(frame.assign(patient_id=frame["dicom_path"]), 0.5, 300, 0)["auc"]
    assert clustered[1] - clustered[0] > 1.8 * (naive[1] - naive[0])


def test_aggregation_and_leakage() -> None:
    frame = _frame(np.array([0, 1, 0, 0]), np.array([0.2, 0.9, 0.3, 0.1]), ["a", "a", "b", "b"])
    patients = m.aggregate(frame, "patient", "max")
    assert patients.set_index("patient_id")["score"].to_dict() == {"a": 0.9, "b": 0.3}
    assert patients.set_index("patient_id")["label"].to_dict() == {"a": 1, "b": 0}
    mean = m.aggregate(frame, "patient", "mean").set_index("patient_id")["score"]
    assert mean["a"] == pytest.approx(0.55)
    leaked = frame.assign(split=["train", "test", "test", "test"])
    assert m.leakage(leaked)["patients_in_several_splits"] == 1
    assert m.leakage(frame)["patients_in_several_splits"] == 0


def test_subgroups_and_age_bands() -> None:
    labels = np.array([0, 1] * 20)
    scores = np.linspace(0, 1, 40)
    frame = _frame(labels, scores).assign(sex=["F", "M"] * 20, age=[30, 70] * 10 + [None, 85] * 10)
    rows = m.subgroups(frame, 0.5, 0, 0)
    values = {(r["attribute"], r["value"]) for r in rows}
    assert {("sex", "F"), ("sex", "M"), ("age_band", "unknown"), ("age_band", "80+")} <= values
    assert m.age_band(17) == "<18" and m.age_band(None) == "unknown"
