"""The training recipe's parts: acquisition-shift augmentation, AdamW with warm-up, ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from trainer import shifts
from trainer.config import TrainConfig


def _batch() -> tf.Tensor:
    ramp = np.linspace(0.0, 1.0, 64 * 64, dtype=np.float32).reshape(1, 64, 64, 1)
    return tf.constant(np.concatenate([ramp, ramp[:, ::-1]], axis=0))


def test_each_shift_keeps_shape_and_range_and_does_what_it_says() -> None:
    images = _batch()
    for name, (_, shift) in shifts.ROBUSTNESS_SHIFTS.items():
        out = shift(images).numpy()
        assert out.shape == images.shape, name
        assert out.min() >= 0.0 and out.max() <= 1.0, name
        assert not np.allclose(out, images.numpy()), name
    x = images.numpy()
    np.testing.assert_allclose(
        shifts.gamma(images, 2.0).numpy(), np.maximum(x, 1e-6) ** 2, atol=1e-6
    )
    blurred = shifts.blur(images, 1.0).numpy()
    assert abs(blurred.mean() - x.mean()) < 1e-3  # blur moves no intensity
    flat = shifts.contrast(images, 0.0).numpy()
    np.testing.assert_allclose(
        flat, np.broadcast_to(x.mean(axis=(1, 2, 3), keepdims=True), x.shape), atol=1e-6
    )


def test_augmentation_with_every_shift_is_seeded_and_stays_in_range() -> None:
    from trainer import data

    config = TrainConfig(
        data_dir="unused",
        output_dir="unused",
        gamma=0.4,
        blur_sigma=1.5,
        resolution_jitter=0.5,
        noise_std=0.05,
    )
    images = tf.tile(_batch(), [4, 1, 1, 1])
    seed = tf.constant([0, 5], tf.int64)
    first = data.augment_batch(images, config, seed).numpy()
    again = data.augment_batch(images, config, seed).numpy()
    other = data.augment_batch(images, config, tf.constant([0, 6], tf.int64)).numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.min() >= 0.0 and first.max() <= 1.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("optimizer", "sgd"),
        ("resolution_jitter", 1.0),
        ("ensemble", 0),
        ("min_steps_per_epoch", -1),
    ],
)
def test_bad_recipe_values_are_refused(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        TrainConfig(data_dir="d", output_dir="o", **{field: value})


@pytest.mark.slow
def test_an_ensemble_exports_one_model_that_averages_its_members(
    preprocessed: Path, tmp_path: Path
) -> None:
    import keras

    from trainer import train
    from trainer.models import build_model

    out = tmp_path / "results"
    card = train.run(
        [
            "--data_dir",
            str(preprocessed),
            "--output_dir",
            str(out),
            "--epochs",
            "2",
            "--steps_per_epoch",
            "2",
            "--global_batch_size",
            "8",
            "--verbose",
            "0",
            "--ensemble",
            "2",
            "--optimizer",
            "adamw",
            "--lr_schedule",
            "cosine",
            "--warmup_epochs",
            "1",
            "--label_smoothing",
            "0.1",
            "--gamma",
            "0.3",
            "--blur_sigma",
            "1.0",
            "--resolution_jitter",
            "0.3",
            "--noise_std",
            "0.02",
        ]
    )
    assert card["ensemble"]["members"] == 2 and len(card["ensemble"]["member_best_val_auc"]) == 2
    assert card["epochs_run"] == 4 and card["operating_point"] is not None
    model = keras.saving.load_model(str(out / "model" / "model.keras"), safe_mode=True)
    manifest = json.loads((preprocessed / "manifest.json").read_text())
    stats = manifest["train_pixel_stats"]
    members = []
    for k in range(2):
        member = build_model(
            "simple_cnn", stats["mean"], stats["std"], model_name=f"simple_cnn_member{k}"
        )
        member.load_weights(str(out / "members" / str(k) / "member.weights.h5"))
        members.append(member)
    images = np.random.default_rng(0).random((3, 224, 224, 1), dtype=np.float32)
    expected = np.mean([m.predict(images, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(model.predict(images, verbose=0), expected, atol=1e-6)
    assert not np.allclose(members[0].predict(images, verbose=0), expected, atol=1e-6)


@pytest.mark.slow
def test_pretrained_weights_file_and_offline_imagenet(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import keras

    from trainer import models

    # A weights file of the three-channel backbone, made here (no download).
    source = models.backbone("efficientnetb0", str(_saved_backbone(tmp_path)))
    model = models.build_model("efficientnetb0", weights=str(tmp_path / "backbone.weights.h5"))
    inner = model.get_layer(source.name)
    for got, want in zip(inner.get_weights(), source.get_weights(), strict=True):
        np.testing.assert_array_equal(got, want)
    assert model.input_shape == (None, 224, 224, 1)  # the grey image, replicated inside

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_cache"))

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.utils.file_utils.get_file", offline, raising=False)
    with pytest.raises(models.WeightsUnavailable, match="efficientnetb0_notop.h5 in .*empty_cache"):
        models.backbone("efficientnetb0", "imagenet")
    with pytest.raises(ValueError, match="simple_cnn"):
        models.build_model("simple_cnn", weights="imagenet")


def _saved_backbone(tmp_path: Path) -> Path:
    import keras

    path = tmp_path / "backbone.weights.h5"
    keras.utils.set_random_seed(3)
    keras.applications.EfficientNetB0(
        weights=None, include_top=False, input_shape=(224, 224, 3), pooling="avg"
    ).save_weights(str(path))
    return path


@pytest.mark.slow
def test_init_model_fine_tunes_with_a_frozen_start(
    trained_model: Path, preprocessed: Path, tmp_path: Path
) -> None:
    import keras

    from trainer import train

    before = keras.saving.load_model(str(trained_model / "model" / "model.keras"))
    out = tmp_path / "site_b"
    card = train.run(
        [
            "--data_dir", str(preprocessed),
            "--output_dir", str(out),
            "--init_model", str(trained_model / "model"),
            "--epochs", "2",
            "--freeze_epochs", "1",
            "--learning_rate", "1e-4",
            "--steps_per_epoch", "2",
            "--global_batch_size", "8",
            "--verbose", "0",
        ]
    )  # fmt: skip
    assert card["epochs_run"] == 2
    after = keras.saving.load_model(str(out / "model" / "model.keras"))
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(before.get_weights(), after.get_weights(), strict=True)
    ]
    assert any(changed)  # it trained from the given model, not from scratch...
    same_architecture = [a.shape for a in before.get_weights()] == [
        b.shape for b in after.get_weights()
    ]
    assert same_architecture
    with pytest.raises(SystemExit):
        train.run(
            ["--data_dir", str(preprocessed), "--output_dir", str(tmp_path / "x")]
            + ["--init_model", str(tmp_path / "nowhere")]
        )


@pytest.mark.slow
def test_a_run_stopped_after_its_frozen_phase_resumes_at_the_second_phase(
    trained_model: Path, preprocessed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import csv

    import keras

    from trainer import train

    args = [
        "--data_dir", str(preprocessed),
        "--output_dir", str(tmp_path / "b"),
        "--init_model", str(trained_model / "model"),
        "--epochs", "3",
        "--freeze_epochs", "1",
        "--steps_per_epoch", "2",
        "--global_batch_size", "8",
        "--verbose", "0",
    ]  # fmt: skip
    real_fit, starts = keras.Model.fit, []

    def fit(self: keras.Model, *a: object, **kw: object) -> object:
        starts.append(kw["initial_epoch"])
        if len(starts) == 2:  # dies as the second phase begins (Keras dropped the backup)
            raise RuntimeError("killed")
        return real_fit(self, *a, **kw)

    monkeypatch.setattr(keras.Model, "fit", fit)
    with pytest.raises(RuntimeError, match="killed"):
        train.run(args)
    starts.clear()
    train.run(args)
    assert starts == [1]  # the frozen phase is not trained again
    with (tmp_path / "b" / "history.csv").open() as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [0, 1, 2]
