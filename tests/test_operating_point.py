"""The model's operating point end to end: train -> model card -> score 'predicted' -> analysis."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from analysis import analyze
from beam_pipelines import score
from beam_pipelines.contracts import operating_point, predictions
from tests.support.runners import LOCAL_RUNNER

pytestmark = pytest.mark.slow


def _table(paths: list[Path]) -> dict[str, list]:
    return predictions.read([str(p) for p in paths]).to_pydict()


def test_choose_and_predicted_follow_the_rule() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9]
    point = operating_point.choose(labels, scores, "youden")
    assert point["threshold"] == pytest.approx(0.65)  # halfway between 0.7 and 0.6
    assert point["validation"] == {"n": 8, "sensitivity": 0.75, "specificity": 1.0, "ppv": 1.0}
    assert operating_point.predicted(scores, point) == [0, 0, 0, 0, 0, 1, 1, 1]
    assert operating_point.choose(labels, scores, "sens=1.0")["threshold"] == pytest.approx(0.35)
    assert operating_point.choose(labels, scores, "ppv=0.75")["threshold"] == pytest.approx(0.35)
    assert operating_point.choose([0, 1], [0.2, 0.2], "youden")["threshold"] == 0.2  # none below
    assert operating_point.predicted(scores, None) == [None] * 8
    with pytest.raises(ValueError, match="not a fixed number"):
        operating_point.check_rule("0.5")


def test_the_trainer_stores_its_operating_point_and_predicts_at_it(trained_model: Path) -> None:
    card = json.loads((trained_model / "model_card.json").read_text())
    point = card["operating_point"]
    assert point["rule"] == "youden" and point["chosen_on"] == "validation"
    assert 0.0 <= point["threshold"] <= 1.0
    assert set(point["validation"]) == {"n", "sensitivity", "specificity", "ppv"}
    stored = json.loads((trained_model / "model" / operating_point.FILE).read_text())
    assert stored == point
    files = sorted((trained_model / "predictions").glob("*.parquet"))
    assert operating_point.from_footers([str(f) for f in files]) == [point]
    table = _table(files)
    expected = (np.array(table["score"]) >= point["threshold"]).astype(int)
    assert table["predicted"] == expected.tolist()


def test_scoring_uses_the_models_point_or_the_given_threshold_and_analysis_follows(
    synthetic_archive: Path, trained_model: Path, tmp_path: Path
) -> None:
    point = json.loads((trained_model / "model_card.json").read_text())["operating_point"]
    base = [
        "--model",
        str(trained_model / "model"),
        "--metadata",
        str(synthetic_archive / "metadata.csv"),
        *LOCAL_RUNNER,
    ]
    summary = score.run([*base, "--output", str(tmp_path / "scores" / "archive")])
    assert summary["operating_point"] == point
    files = sorted((tmp_path / "scores").glob("archive-*.parquet"))
    table = _table(files)
    scores = np.array(table["score"])
    assert table["predicted"] == (scores >= np.float32(point["threshold"])).astype(int).tolist()
    assert json.loads(pq.read_schema(files[0]).metadata[operating_point.FOOTER_KEY]) == point

    fixed = score.run(
        [*base, "--output", str(tmp_path / "fixed" / "archive"), "--threshold", "0.3"]
    )
    assert fixed["operating_point"] == {
        "rule": "fixed",
        "threshold": 0.3,
        "chosen_on": "--threshold",
    }
    table = _table(sorted((tmp_path / "fixed").glob("archive-*.parquet")))
    assert table["predicted"] == (np.array(table["score"]) >= np.float32(0.3)).astype(int).tolist()

    # Scored archives carry no split: the analysis takes the model's threshold...
    pattern = str(tmp_path / "scores" / "archive-*.parquet")
    common = ["--predictions", pattern, "--bootstrap", "20"]
    document = analyze.run([*common, "--output_dir", str(tmp_path / "analysis")])
    assert document["threshold"]["value"] == pytest.approx(point["threshold"])
    assert document["threshold"]["chosen_on"].startswith("model operating point (youden")
    assert not any("OPTIMISTIC" in w for w in document["warnings"])
    assert not any("chosen on images" in w for w in document["warnings"])
    patients = analyze.run(
        [*common, "--level", "patient", "--output_dir", str(tmp_path / "patients")]
    )
    assert patients["threshold"]["value"] == pytest.approx(point["threshold"])
    assert any("chosen on images" in w for w in patients["warnings"])
    # ...and says loudly when asked to choose one on the evaluated data itself.
    chosen = analyze.run(
        [*common, "--threshold", "youden", "--output_dir", str(tmp_path / "optimistic")]
    )
    assert any(w.startswith("OPTIMISTIC") for w in chosen["warnings"])
    with pytest.raises(SystemExit):
        score.run([*base, "--output", str(tmp_path / "bad" / "x"), "--threshold", "1.5"])


def test_the_threshold_is_a_float32_that_splits_adjacent_scores_as_on_validation() -> None:
    import numpy as np

    high = np.float32(0.9999999)
    low = np.nextafter(high, np.float32(0))  # adjacent float32 scores
    point = operating_point.choose([0, 1], [float(low), float(high)], "youden")
    assert np.float32(point["threshold"]) == point["threshold"]
    assert point["threshold"] == float(high)  # no float32 between them: the cut itself
    scores = np.array([low, high], np.float32)
    assert (scores >= point["threshold"]).tolist() == [False, True]
