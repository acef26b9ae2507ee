"""beam_pipelines.contracts.records: the record contract round-trips, in numpy and in TF."""

from __future__ import annotations

import numpy as np
import pytest

from beam_pipelines.contracts import records


def _record(**overrides: object) -> dict:
    rng = np.random.default_rng(0)
    record = {
        "image": rng.random(records.IMAGE_SHAPE, dtype=np.float32),
        "label": True,
        "patient_id": "P000001",
        "study_id": "S0001",
        "dicom_path": "raw/P000001/S0001_1.dcm",
        "view_position": "PA",
        "sex": "F",
        "age": 65,
        "original_rows": 2500,
        "original_columns": 2048,
        "sop_instance_uid": "1.2.3",
        "extra": {"Site": "north, wing B", "Ünicode": "é"},
    }
    record.update(overrides)
    return record


def test_round_trip_is_lossless_at_16_bits() -> None:
    record = _record()
    parsed = records.parse_example(records.serialize(record))
    assert parsed["image"].shape == records.IMAGE_SHAPE
    assert parsed["image"].dtype == np.float32
    assert np.abs(parsed["image"] - record["image"]).max() <= 0.5 / 65535 + 1e-7
    for key in ("patient_id", "study_id", "dicom_path", "view_position", "sex", "age"):
        assert parsed[key] == record[key]
    assert parsed["label"] == 1
    assert (parsed["original_rows"], parsed["original_columns"]) == (2500, 2048)
    assert parsed["extra"] == record["extra"]


def test_unknowns_round_trip() -> None:
    parsed = records.parse_example(
        records.serialize(_record(age=None, sex=None, view_position="", label=0, extra=None))
    )
    assert parsed["age"] is None and parsed["sex"] == "" and parsed["label"] == 0
    assert parsed["extra"] == {}


def test_serialization_is_deterministic() -> None:
    assert records.serialize(_record()) == records.serialize(_record())


def test_stored_values_serialize_like_the_float_image() -> None:
    # The decode stage quantizes once and passes the uint16 values on.
    record = _record()
    stored = _record(image=records.quantize(record["image"]))
    assert stored["image"].dtype == np.uint16
    assert records.serialize(stored) == records.serialize(record)


def test_wrong_image_shape_is_an_error() -> None:
    with pytest.raises(ValueError):
        records.serialize(_record(image=np.zeros((100, 100), np.float32)))


def test_tf_parser_matches_numpy_parser() -> None:
    tf = pytest.importorskip("tensorflow")
    from trainer.data import tf_parse_example, tf_parse_examples

    serialized = records.serialize(_record())
    expected = records.parse_example(serialized)
    parsed = tf_parse_example(tf.constant(serialized))
    np.testing.assert_array_equal(parsed["image"].numpy(), expected["image"])
    assert int(parsed["label"]) == 1
    assert parsed["patient_id"].numpy().decode() == "P000001"
    dataset = tf.data.Dataset.from_tensor_slices([serialized] * 3).map(tf_parse_example)
    batch = next(iter(dataset.batch(3)))
    assert tuple(batch["image"].shape) == (3, *records.IMAGE_SHAPE)
    batched = tf_parse_examples(tf.constant([serialized] * 3))
    np.testing.assert_array_equal(batched["image"].numpy(), batch["image"].numpy())
    assert batched["patient_id"].numpy().tolist() == [b"P000001"] * 3


def test_records_are_tensorflow_examples_byte_for_byte() -> None:
    tf = pytest.importorskip("tensorflow")
    serialized = records.serialize(_record())
    parsed = tf.train.Example.FromString(serialized)
    assert parsed.SerializeToString(deterministic=True) == serialized
    assert parsed.features.feature["patient_id"].bytes_list.value[0] == b"P000001"


def test_serialize_and_parse_do_not_import_tensorflow() -> None:
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from beam_pipelines.contracts import records\n"
        "r = {'image': np.zeros((224, 224, 1), np.float32), 'label': 1, 'patient_id': 'p',\n"
        "     'dicom_path': 'd', 'original_rows': 1, 'original_columns': 1}\n"
        "assert records.parse_example(records.serialize(r))['label'] == 1\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
