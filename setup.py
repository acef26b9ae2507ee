"""Shim so Beam workers can install the project with ``--setup_file ./setup.py``.

All metadata lives in pyproject.toml.
"""

from setuptools import setup

setup()
