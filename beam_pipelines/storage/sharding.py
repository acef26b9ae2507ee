"""Deterministic sharding shared by the jobs that write sharded outputs."""

from __future__ import annotations

import hashlib


def shard_count(records: int, fixed: int, per_shard: int) -> int:
    """The fixed number of shards asked for, else one per ``per_shard`` records."""
    if fixed > 0:
        return fixed
    return max(1, -(-records // per_shard))


def shard_of(dicom_path: str, shards: int) -> int:
    """A record's shard: a stable hash of its path, so reruns put it in the same file."""
    digest = hashlib.sha256(dicom_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards
