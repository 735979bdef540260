"""The suite's own honesty rules (tests/conftest.py): with CI=true a skip fails the session unless it is
on tests/skip_allowlist.txt; markers follow the fixtures a test uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SAMPLE = '''
import pytest

def test_runs():
    assert True

def test_skips():
    pytest.skip("the thing is not installed")

@pytest.mark.skipif(True, reason="never here")
def test_allowed_skip():
    pass
'''


def _pytest(tmp_path: Path, ci: str | None, allow: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "allow.txt").write_text(allow)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["RADCOHORT_SKIP_ALLOWLIST"] = str(tmp_path / "allow.txt")
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_sample.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_outside_the_allowlist_fails_the_session_in_ci(tmp_path):
    r = _pytest(tmp_path, "true", "*::test_allowed_skip  # reason given\n")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 passed, 2 skipped" in r.stdout
    assert "skips are failures in CI" in r.stdout
    assert "test_sample.py::test_skips: Skipped: the thing is not installed" in r.stdout
    assert "test_allowed_skip" not in r.stdout.split("skips are failures in CI")[1]


def test_allowlisted_skips_pass_in_ci_and_any_skip_passes_outside_ci(tmp_path):
    r = _pytest(tmp_path, "true", "*::test_skips  # a reason\n*::test_allowed_skip  # another\n")
    assert r.returncode == 0, r.stdout
    r = _pytest(tmp_path, None, "")
    assert r.returncode == 0 and "2 skipped" in r.stdout, r.stdout


def test_an_allowlist_entry_without_a_reason_is_an_error(tmp_path):
    r = _pytest(tmp_path, "true", "*::test_skips\n")
    assert r.returncode != 0 and "expected `nodeid-glob  # reason`" in (r.stdout + r.stderr)


def test_the_real_allowlist_is_well_formed_and_short():
    from tests.conftest import SKIP_ALLOWLIST, skip_allowlist

    entries = skip_allowlist(SKIP_ALLOWLIST)
    assert len(entries) <= 10 and all(reason for _, reason in entries)


def test_markers_follow_the_fixtures(tmp_path):
    """`-m postgres` selects the PostgreSQL half of a db_url test and pg_ctx tests; `-m orthanc` the
    tests that use the orthanc fixture (without running them: --collect-only)."""
    def collected(mark: str, path: str) -> set[str]:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                            "-m", mark, path], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return {line.strip() for line in r.stdout.splitlines() if "::" in line}

    pg = collected("postgres", "tests/hardening/test_api_fuzz.py")
    assert pg and all("postgresql" in n for n in pg), pg
    orth = collected("orthanc", "tests/api/test_pacs.py")
    assert "tests/api/test_pacs.py::test_echo_ok_and_unreachable" in orth
    assert not any("test_node_validation" in n for n in orth)
    assert "tests/api/test_pacs.py::test_node_crud_and_audit" in collected("not orthanc", "tests/api/test_pacs.py")
