"""The file contracts between the four jobs: one module owns each file's layout.

Plain Python (numpy, pyarrow, protobuf): no Beam, no TensorFlow, so the
trainer and the analysis read them as the Beam jobs write them. Producers and
consumers import the same module, so a column, a feature key or a file name
is spelled once (docs/contracts.md).
"""
