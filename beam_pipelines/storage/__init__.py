"""Where bytes live: local paths through the OS, everything else through Beam's FileSystems.

Atomic files, the transactional output committer and its lock, TFRecord
files, the staging of compressed records, paths and URI schemes. Beam is
imported lazily, so the trainer and the analysis use these modules without
loading the Beam SDK. Nothing here knows a contract's columns.
"""
