"""How a file is refused: :class:`DicomRejected` and its stable reason codes."""

from __future__ import annotations

from typing import Any

#: Every reason :class:`DicomRejected` can carry; stable machine codes.
REJECT_REASONS: frozenset[str] = frozenset(
    {
        "missing_file",
        "fetch_failed",
        "unreadable",
        "empty_file",
        "not_dicom",
        "truncated",
        "no_pixel_data",
        "pixel_length_mismatch",
        "unsupported_photometric",
        "unsupported_transfer_syntax",
        "unsupported_pixel_format",
        "multi_frame",
        "too_large",
        "decode_failed",
    }
)


class DicomRejected(Exception):
    """A file that cannot become a model input, with a stable reason code.

    Attributes:
        reason: one of :data:`REJECT_REASONS`.
        detail: a human explanation free of header values.
    """

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Beam pickles exceptions across processes; keep both fields.
        return (DicomRejected, (self.reason, self.detail))
