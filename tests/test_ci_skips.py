"""Under CI a skipped test fails (tests/conftest.py), in every form a skip takes.

A throwaway test directory gets a conftest that loads this suite's hooks; pytest runs it in a
subprocess with and without CI set, and the outcomes are read from its summary line.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, child_env

CONFTEST = f"""
import importlib.util
import sys
spec = importlib.util.spec_from_file_location("suite_conftest", {str(REPO / "tests" / "conftest.py")!r})
suite = sys.modules["suite_conftest"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(suite)
pytest_runtest_makereport = suite.pytest_runtest_makereport
pytest_make_collect_report = suite.pytest_make_collect_report
"""

TESTS = {
    "test_kinds.py": """
import pytest

@pytest.fixture
def needs_a_cluster():
    pytest.skip("no cluster here")

def test_skip_in_the_test():
    pytest.skip("no tmpfs here")

@pytest.mark.skipif(True, reason="a skipif mark")
def test_skipif():
    pass

def test_skip_in_a_fixture(needs_a_cluster):
    pass

@pytest.mark.xfail(reason="a known bug", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
""",
    "test_import.py": """
import pytest
pytest.importorskip("a_module_that_does_not_exist_anywhere")

def test_never_collected():
    pass
""",
}


def run_pytest(directory: Path, name: str, ci: str | None) -> subprocess.CompletedProcess:
    env = child_env()
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-c", str(directory / "pytest.ini"),
                           "-p", "no:cacheprovider", "-p", "no:xdist", "-rfEs", "-q", name],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name, text in TESTS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def counts(proc: subprocess.CompletedProcess) -> dict[str, int]:
    summary = proc.stdout.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


@pytest.mark.parametrize("ci", ["true", "1"])
def test_under_ci_every_kind_of_skip_fails_with_its_reason(suite, ci):
    proc = run_pytest(suite, "test_kinds.py", ci)
    assert proc.returncode == 1, proc.stdout[-3000:]
    # a skip in setup (a skipif mark, a fixture) fails the setup: pytest reports it as an error
    assert counts(proc) == {"failed": 1, "errors": 2, "passed": 1, "xfailed": 1}, proc.stdout[-3000:]
    for reason in ("no tmpfs here", "a skipif mark", "no cluster here"):
        assert reason in proc.stdout, (reason, proc.stdout[-3000:])
    assert f"skipped under CI={ci}, which counts as a failure" in proc.stdout
    # a module-level importorskip is a collection error, which interrupts the session (exit 2)
    proc = run_pytest(suite, "test_import.py", ci)
    assert proc.returncode == 2 and counts(proc) == {"error": 1}, proc.stdout[-3000:]
    assert "could not import 'a_module_that_does_not_exist_anywhere'" in proc.stdout


@pytest.mark.parametrize("ci", [None, "false"])
def test_outside_ci_skips_stay_skips(suite, ci):
    proc = run_pytest(suite, ".", ci)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert counts(proc) == {"passed": 1, "skipped": 4, "xfailed": 1}, proc.stdout[-3000:]
