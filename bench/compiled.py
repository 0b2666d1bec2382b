"""Byte-compile the package before a benchmark measures a start, as an install does.

`pip install` (a wheel, pipx, the image) writes every module's bytecode at install time, so the
installed command never compiles its sources when it starts. A checkout run in place writes it
at first import, unless PYTHONDONTWRITEBYTECODE is set (it is on some machines, this project's
included): then every run compiles ~70 modules again, ~0.15 s of a `reconciler plan` that no
user pays. The benchmarks measure what users run.
"""

from __future__ import annotations

import compileall
from pathlib import Path

import reconciler


def compile_package() -> None:
    compileall.compile_dir(Path(reconciler.__file__).parent, quiet=1)
