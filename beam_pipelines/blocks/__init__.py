"""Preprocessing in blocks: the local runner's way to flat memory, whatever the archive's size.

Beam's local FnApiRunner holds every PCollection that crosses a stage
boundary in memory, so the one-graph job (:mod:`beam_pipelines.preprocess`)
needs ~7 KB per metadata row there. In blocks, the job does the same work in
three steps that each hold a bounded amount, or a compact summary per file
and per patient:

1. :mod:`~beam_pipelines.blocks.row_plan`: the driver reads metadata.csv once,
   validates, pseudonymizes and de-duplicates the rows, plans the splits, and
   spills the kept rows to one file (their rejects to another, in row order);
2. :mod:`~beam_pipelines.blocks.decode`: one Beam pipeline decodes blocks of
   spilled rows in parallel (only block references cross its stages); each
   block's summaries and rejects go to files;
3. :mod:`~beam_pipelines.blocks.finish`: the driver merges those files into
   the shards, rejects file, splits.csv and manifest.

The outputs are byte-identical to the one-graph job's (tested), which
clusters run: their shuffle, not the driver, holds the stages.
"""
