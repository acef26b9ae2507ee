"""trainer.config: defaults < file < flags, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.config import load_config


def test_flags_override_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: /d\noutput_dir: /o\nepochs: 7\nmodel: resnet50\naugment: false\n")
    config = load_config(["--config", str(path), "--epochs", "3"])
    assert (config.epochs, config.model, config.augment) == (3, "resnet50", False)
    assert json.loads(config.to_json())["epochs"] == 3


def test_json_file_and_bool_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"data_dir": "/d", "output_dir": "/o", "flip": True}))
    assert load_config(["--config", str(path), "--augment", "no"]).augment is False
    assert load_config(["--config", str(path)]).flip is True


@pytest.mark.parametrize(
    "argv",
    [
        ["--output_dir", "/o"],
        ["--data_dir", "/d", "--output_dir", "/o", "--model", "vgg"],
        ["--data_dir", "/d", "--output_dir", "/o", "--epochs", "0"],
        ["--data_dir", "/d", "--output_dir", "/o", "--augment", "maybe"],
    ],
)
def test_bad_configuration_exits(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        load_config(argv)


def test_unknown_file_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data_dir: /d\noutput_dir: /o\nepoch: 3\n")
    with pytest.raises(SystemExit):
        load_config(["--config", str(path)])
