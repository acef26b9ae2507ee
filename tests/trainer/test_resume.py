"""Resuming: a backup cut short while written is recovered from its previous pair, or dropped."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def test_backup_cut_while_written_is_recovered_or_dropped(tmp_path: Path) -> None:
    import h5py

    from trainer.resume import usable_backup

    backup = tmp_path / "backup"
    backup.mkdir()
    (backup / "latest.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(40))  # cut short
    (backup / "training_metadata.json").write_text('{"epoch": 3}')
    with h5py.File(backup / "latest.weights.h5.bkp", "w") as handle:
        handle.create_dataset("w", data=np.zeros(3))
    (backup / "training_metadata.json.bkp").write_text('{"epoch": 2}')
    assert usable_backup(str(backup)) == 2  # the previous, complete backup
    assert (backup / "latest.weights.h5").read_bytes() == (
        backup / "latest.weights.h5.bkp"
    ).read_bytes()

    (backup / "latest.weights.h5").write_bytes(b"garbage")
    (backup / "latest.weights.h5.bkp").write_bytes(b"garbage")
    assert usable_backup(str(backup)) is None  # nothing loadable: start over
    assert not backup.exists()
