"""Beam jobs (preprocess, score) and the contracts they own (metadata, DICOM decoding, schema)."""
