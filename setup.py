"""Build hook: ship the sample project (examples/) inside the package as app/examples.

Everything else is in pyproject.toml. In a checkout (and an editable install)
app/wiring.py finds examples/ next to app/; an installed wheel has the copy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
NOT_SHIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "dist", ".cache", "*.db")


class BuildWithExamples(build_py):
    def run(self) -> None:
        super().run()
        source = HERE / "examples"
        if not self.dry_run and source.is_dir():
            target = Path(self.build_lib) / "app" / "examples"
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=NOT_SHIPPED)


setup(cmdclass={"build_py": BuildWithExamples})
