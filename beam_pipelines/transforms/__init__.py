"""The Beam composites and DoFns the jobs are made of (each tested with TestPipeline).

``rows`` (metadata.csv -> valid rows or rejects), ``decode`` (the one
decode-or-reject step), ``preprocessing`` and ``scoring`` (the jobs'
composites), ``shards`` (sharded, sorted, atomic writes), ``outcomes``
(kept/rejected routing, the rejects file), ``inference`` (the RunInference
model handler). Stages emit (KEPT|REJECTED, value) pairs, never tagged
outputs (docs/decisions/no-tagged-outputs.md).
"""
