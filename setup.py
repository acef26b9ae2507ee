"""Builds the optional C kernel; Beam workers install with ``--setup_file ./setup.py``.

All metadata lives in pyproject.toml. The kernel (``beam_pipelines.dicom._pixel_kernels``)
is optional: without a C compiler the build skips it and ``beam_pipelines.dicom``
uses its numpy fallback, which gives bit-identical results, only slower.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "beam_pipelines.dicom._pixel_kernels",
            ["beam_pipelines/dicom/_pixel_kernels.c"],
            # No FMA contraction: float32 results must equal numpy's to the bit.
            extra_compile_args=["-O3", "-ffp-contract=off"],
            optional=True,
        )
    ]
)
