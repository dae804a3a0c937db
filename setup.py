"""Build the optional native kernels (plain C, loaded with ctypes; no Python C API).

Everything is declared in pyproject.toml; this file only adds the shared library. It is
`optional`: without a C compiler the install still succeeds and the package uses its numpy
kernels, which give the same verdicts and digests (see docs/performance.md).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pytest_ckptparity._ckptkernel",
            sources=["pytest_ckptparity/native/fingerprint.c", "pytest_ckptparity/native/compare.c"],
            depends=["pytest_ckptparity/native/common.h"],  # a changed header rebuilds both (and ships in the sdist)
            # No FMA contraction: every float operation rounds as numpy's does. No -ffast-math:
            # NaN and inf follow IEEE and sums keep the order written in the source.
            extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno", "-std=c99"],
            optional=True,
        )
    ]
)
