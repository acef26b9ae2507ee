"""Redaction (beam_pipelines.privacy): no header value in messages, logs or warnings."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

from beam_pipelines.privacy import install_log_filters, quiet_plugin_errors, redact, redact_text

REPO = Path(__file__).resolve().parents[2]


def test_redaction_blanks_what_may_be_header_values_and_keeps_the_rest() -> None:
    message = (
        "bad 'quoted' and \"double\" values, Doe^Jane^M, UID 1.2.840.113619.2.55.3, "
        "ID 0012345678, born 19500101; expected 2500 x 2048 at (0028,0010), 16 bits"
    )
    redacted = redact_text(message)
    for secret in ("quoted", "double", "Doe", "Jane", "113619", "0012345678", "19500101"):
        assert secret not in redacted
    assert "expected 2500 x 2048 at (0028,0010), 16 bits" in redacted
    assert redact(ValueError(message + "\nsecond line")) == redact_text(message + " second line")
    # pydicom quotes element names that hold an apostrophe themselves.
    pydicom_message = (
        "Invalid buffer for (0010,0030) 'Patient's Birth Date': could not convert "
        "'1970-01-01' to date; born 1970-01-01, Van Der Berg^Jan, 'Patient's Age' '45 years'"
    )
    redacted = redact_text(pydicom_message)
    for secret in ("1970", "Van", "Der", "Berg", "Jan", "45 years"):
        assert secret not in redacted, redacted
    assert redacted.startswith("Invalid buffer for (0010,0030)")
    # What is not a header value stays: byte counts, the standard's own UIDs.
    diagnostic = "got 2097152 of 8388608 bytes for 1.2.840.10008.1.2.4.90"
    assert redact_text(diagnostic) == diagnostic


def test_install_log_filters_is_idempotent_and_filters_pydicom() -> None:
    loggers = [
        logging.getLogger(name)
        for name in ("pydicom", "pydicom.pixels.utils", "pydicom.pixels.decoders.base")
    ]
    with warnings.catch_warnings():
        install_log_filters()
        before = [list(logger.filters) for logger in loggers], list(warnings.filters)
        install_log_filters()
        assert ([list(logger.filters) for logger in loggers], list(warnings.filters)) == before
    assert all(before[0])  # every pydicom logger got a filter
    record = logging.LogRecord("pydicom", logging.WARNING, __file__, 1, "bad %s", ("'X^Y'",), None)
    assert all(f.filter(record) for f in loggers[0].filters)  # type: ignore[union-attr]
    assert record.getMessage() == "bad …"


def test_plugin_errors_are_dropped_only_inside_the_context_and_thread() -> None:
    install_log_filters()
    plugins = logging.getLogger("pydicom.pixels.decoders.base")

    def kept() -> bool:
        record = logging.LogRecord(plugins.name, logging.ERROR, __file__, 1, "boom", None, None)
        return plugins.filter(record)

    assert kept()
    with quiet_plugin_errors():
        assert not kept()
    assert kept()


def test_nothing_is_installed_at_import() -> None:
    """Importing the decoder or privacy changes no logger or warning filter, and needs no Beam."""
    probe = """
import logging, sys, warnings
import beam_pipelines.dicom, beam_pipelines.privacy
names = ("pydicom", "pydicom.pixels.utils", "pydicom.pixels.decoders.base")
assert not any(logging.getLogger(n).filters for n in names)
# (numpy and urllib3 add their own filters when imported.)
assert not [f for f in warnings.filters if "pydicom" in str(getattr(f[3], "pattern", f[3]))]
assert "apache_beam" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)
