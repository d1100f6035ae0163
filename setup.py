"""Optional C accelerators for the hottest parse paths (everything else: pyproject.toml).

Each is ``optional``: without a C compiler or Python's headers the install still
succeeds, and the pure-Python module beside each one does the same work, slower.
``service.speedups`` loads them and reports which are in use.
"""

import os
import runpy

from setuptools import Extension, setup

# Read the table from the file itself: importing the package would import its dependencies.
ACCELERATORS = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "service", "speedups.py"),
                              run_name="speedups")["ACCELERATORS"]

_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]

_HERE = os.path.dirname(os.path.abspath(__file__))

#: Headers some sources include: a change to one rebuilds every extension (they are small).
_HEADERS = ["service/_slots.h"]

setup(
    ext_modules=[Extension(mod, [src], optional=True, extra_compile_args=_FLAGS, depends=_HEADERS)
                 for mod, src in ACCELERATORS.items() if os.path.exists(os.path.join(_HERE, src))],
)
