"""Plain helpers the tests import: runner flags, paths, file snapshots, small inputs.

Fixtures stay in the conftest.py files (which may use these helpers); a test
imports from here, never from a conftest.
"""
