"""Build the Cython fan-out core, the way httptools and asyncpg do.

``pip install -e .`` (or ``pip install .``) runs Cython on gochan/_fast/core.pyx
and compiles the extension in place; the generated C file is not committed.
"""

import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext


class build_ext(_build_ext):
    def finalize_options(self) -> None:
        from Cython.Build import cythonize

        directives = {
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        }
        if os.environ.get("GOCHAN_CYTHON_DEBUG"):
            directives.update(boundscheck=True, wraparound=True)
        self.distribution.ext_modules[:] = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(os.environ.get("GOCHAN_CYTHON_ANNOTATE")),
        )
        super().finalize_options()


setup(
    ext_modules=[
        Extension(
            "gochan._fast.core",
            ["gochan/_fast/core.pyx"],
            extra_compile_args=["-O2"],
        )
    ],
    cmdclass={"build_ext": build_ext},
)
