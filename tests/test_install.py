"""The install: what pyproject.toml promises is really installed, and every install hint works.

CI (``.ci/run``) builds a brand-new virtual environment with the pip that ships with Python and
installs exactly the README's command into it, so these tests see what a new user gets, not
packages left on the machine by hand.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

from conftest import REPO
from dist_mtl.aggregation import AGGREGATORS, EXTRAS, install_hint, make_torchjd_aggregator
from dist_mtl.compat import prepare_libmtl, prepare_torchvision

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXTRA_REQUIREMENTS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]


def _expand(extra: str) -> list[Requirement]:
    """The requirements of ``extra``, with ``dist_mtl[a,b]`` self-references expanded."""
    found = []
    for text in EXTRA_REQUIREMENTS[extra]:
        requirement = Requirement(text)
        if requirement.name.replace("-", "_") == "dist_mtl":
            for inner in sorted(requirement.extras):
                found += _expand(inner)
        else:
            found.append(requirement)
    return found


def _modules(distribution: str) -> list[str]:
    """The top-level modules a distribution installs."""
    normalized = re.sub(r"[-_.]+", "-", distribution).lower()
    modules = [module for module, dists in metadata.packages_distributions().items()
               if any(re.sub(r"[-_.]+", "-", d).lower() == normalized for d in dists)
               and not module.startswith("_") and module.isidentifier()]
    assert modules, f"{distribution} is not installed"
    return modules


@pytest.mark.parametrize("requirement", _expand("dev"), ids=str)
def test_every_package_the_dev_extra_promises_is_installed_and_imports(requirement):
    version = metadata.version(requirement.name)
    assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name} {version}"
    # As dist_mtl imports them: a CUDA torchvision wheel beside the CPU torch needs the two detection
    # op schemas defined first (dist_mtl.compat); timm imports torchvision.
    prepare_torchvision()
    prepare_libmtl()  # LibMTL 1.1.5 imports torchvision.models.utils, gone since torchvision 0.13
    for module in _modules(requirement.name):
        importlib.import_module(module)


def test_the_extras_name_packages_directly_not_extras_of_other_packages():
    """torchjd 0.18 spells its extras ``quadprog-projector``; pip 23.2 does not match
    ``quadprog_projector`` and installs nothing, with only a warning. Naming the packages works on
    every pip."""
    for extra in EXTRA_REQUIREMENTS:
        for requirement in _expand(extra):
            assert not requirement.extras, f"[{extra}] asks for {requirement}: list its packages instead"


def test_install_hints_name_exactly_the_packages_of_the_extra():
    for name, spec in AGGREGATORS.items():
        if spec.extra is not None:
            assert list(EXTRAS[spec.extra]) == EXTRA_REQUIREMENTS[spec.extra], name
            assert install_hint(spec.extra) == "pip install " + " ".join(f"'{r}'" for r in EXTRA_REQUIREMENTS[spec.extra])


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_every_aggregator_builds_after_the_readme_install(name):
    make_torchjd_aggregator(name, {}, 3)


def test_the_install_hint_installs_what_is_missing(tmp_path):
    """The printed command really installs the solvers: pip resolves it against the configured
    indexes in a fresh environment (``--dry-run``: nothing is written)."""
    hint = install_hint("quadprog")
    args = re.findall(r"'([^']+)'", hint)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                           "--no-deps", "--quiet", "--report", str(tmp_path / "report.json"), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    import json

    names = {item["metadata"]["name"].lower() for item in json.loads((tmp_path / "report.json").read_text())["install"]}
    assert names == {"quadprog", "qpsolvers"}
