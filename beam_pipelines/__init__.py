"""The Beam jobs (``preprocess``, ``score``) and what every job shares.

Layers, each importing only the ones below it:

- ``preprocess.py``, ``score.py``: the jobs: flags, preflight, and a ``run()``
  wiring ``Read | Composite | Write`` from ``transforms``.
- ``transforms/``: Beam composites and DoFns the jobs are made of.
- ``dicom/``: DICOM -> model input (no Beam); ``privacy.py``: pseudonyms and
  redaction.
- ``storage/``: where bytes live (local or any Beam filesystem): atomic files,
  the output committer and lock, TFRecord files, staging, paths.
- ``contracts/``: the files the four jobs hand each other (metadata.csv,
  records, splits.csv, manifest.json, predictions, rejects, operating point);
  plain Python, no Beam or TensorFlow: the trainer and the analysis read them too.

``cli.py`` (exit codes, one-line errors) and ``options.py`` (shared flags)
serve the entry points; ``dask_runner.py`` is the project's Dask runner.
"""
