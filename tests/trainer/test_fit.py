"""The fit: compiling with a frozen start, the length of an epoch."""

from __future__ import annotations

from trainer.config import TrainConfig


def test_a_frozen_start_trains_the_output_layer_alone() -> None:
    from trainer import fit
    from trainer.models import build_model

    model = build_model("simple_cnn")
    config = TrainConfig(data_dir="d", output_dir="o", epochs=3, freeze_epochs=1)
    fit.compile_model(model, config, steps_per_epoch=2, frozen=True)
    assert [v.path for v in model.trainable_variables] == ["abnormal/kernel", "abnormal/bias"]
    fit.compile_model(model, config, steps_per_epoch=2, frozen=False)
    assert len(model.trainable_variables) > 2


def test_a_frozen_start_of_an_ensemble_trains_each_members_output_layer() -> None:
    from trainer import export, fit
    from trainer.models import build_model

    config = TrainConfig(data_dir="d", output_dir="o", epochs=3, freeze_epochs=1)
    members = [build_model("simple_cnn", model_name=f"m{k}") for k in range(2)]
    ensemble = export.average(members, config)
    fit.compile_model(ensemble, config, steps_per_epoch=2, frozen=True)
    assert sorted(v.path for v in ensemble.trainable_variables) == [
        "abnormal/bias",
        "abnormal/bias",
        "abnormal/kernel",
        "abnormal/kernel",
    ]


def test_an_epoch_is_one_pass_of_at_least_min_steps_per_epoch() -> None:
    from trainer.fit import steps_in_epoch

    config = TrainConfig(data_dir="d", output_dir="o", global_batch_size=32)
    assert steps_in_epoch(config, 3771) == 118  # Kermany: one pass
    assert steps_in_epoch(config, 320) == 100  # NIH dev: ten passes
    one_pass = TrainConfig(data_dir="d", output_dir="o", min_steps_per_epoch=0)
    assert steps_in_epoch(one_pass, 320) == 10
    assert steps_in_epoch(TrainConfig(data_dir="d", output_dir="o", steps_per_epoch=7), 320) == 7
