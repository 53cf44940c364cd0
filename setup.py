"""Build hook: ship the built-in suites (the top-level ``tasks/*.toml``) as package data.

Everything else about the build is in pyproject.toml. The suite files live in ``tasks/`` (the project
layout), and an installed package finds them in ``tbptt_bench/data/suites/``: this hook copies them there
when a wheel is built. A source checkout (or an editable install) reads ``tasks/`` directly.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSuites(build_py):
    """``build_py`` that also copies ``tasks/*.toml`` into ``tbptt_bench/data/suites/`` of the build."""

    def run(self) -> None:
        super().run()
        suites = sorted((Path(__file__).resolve().parent / "tasks").glob("*.toml"))
        if not suites:
            raise RuntimeError("tasks/*.toml not found: the built-in suites must be part of the build")
        target = Path(self.build_lib) / "tbptt_bench" / "data" / "suites"
        self.mkpath(str(target))
        for suite in suites:
            self.copy_file(str(suite), str(target / suite.name))


setup(cmdclass={"build_py": BuildPyWithSuites})
