"""Shared fixtures: isolated settings, fresh databases (SQLite and PostgreSQL), a real Orthanc."""

from __future__ import annotations

import fnmatch
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from app.config import Settings
from app.context import AppContext
from app.db.migrate import upgrade
from app.devtools.orthanc import OrthancServer, free_port, orthanc_binary

PG_ADMIN_URL = os.environ.get("RADCOHORT_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_url(dbname: str) -> str:
    base, _, _ = PG_ADMIN_URL.rpartition("/")
    return f"{base}/{dbname}"


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = "rc_test_" + uuid.uuid4().hex[:12]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is required for this test: {exc}")
    try:
        yield _pg_url(name)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """Both backends: a fresh SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rc.db'}"
    return request.getfixturevalue("pg_database")


def make_settings(tmp_path: Path, database_url: str | None = None, **kw) -> Settings:
    data = tmp_path / "data"
    return Settings(
        data_dir=data,
        database_url=database_url or f"sqlite:///{tmp_path / 'rc.db'}",
        scp_port=kw.pop("scp_port", None) or free_port(),
        pseudonym_key=kw.pop("pseudonym_key", "test-pseudonym-key"),
        _env_file=None,
        **kw,
    )


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Isolated settings on SQLite in the test's temp dir, on a free SCP port."""
    return make_settings(tmp_path)


def _migrated_ctx(settings: Settings) -> Iterator[AppContext]:
    upgrade(settings.database_url)
    c = AppContext.build(settings)
    yield c
    c.close()


@pytest.fixture
def ctx(settings) -> Iterator[AppContext]:
    yield from _migrated_ctx(settings)


@pytest.fixture
def pg_ctx(tmp_path, pg_database) -> Iterator[AppContext]:
    yield from _migrated_ctx(make_settings(tmp_path, pg_database))


@pytest.fixture
def any_ctx(tmp_path, db_url) -> Iterator[AppContext]:
    """An AppContext on SQLite and on PostgreSQL (parametrized)."""
    yield from _migrated_ctx(make_settings(tmp_path, db_url))


@pytest.fixture
def client(ctx):
    from fastapi.testclient import TestClient

    from app.api import create_app

    with TestClient(create_app(ctx.settings, ctx)) as c:
        yield c


@pytest.fixture
def orthanc_factory(tmp_path) -> Iterator:
    """Start real Orthancs: orthanc_factory(modalities={name: (aet, host, port)}, overrides={...})."""
    if not orthanc_binary():
        pytest.fail("Orthanc is not installed: run .ci/run or `apt-get install orthanc`")
    started: list[OrthancServer] = []

    def make(modalities: dict | None = None, overrides: dict | None = None, name: str = "orthanc") -> OrthancServer:
        srv = OrthancServer(tmp_path / f"{name}-{len(started)}", modalities=modalities or {},
                            overrides=overrides or {})
        srv.start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.discard()  # throwaway data: killed, not shut down cleanly (~3 s saved per Orthanc)


@pytest.fixture
def orthanc(orthanc_factory, settings) -> OrthancServer:
    """A real Orthanc that knows our AE (settings.ae_title on settings.scp_port) as a move destination."""
    return orthanc_factory(modalities={"radcohort": (settings.ae_title, "127.0.0.1", settings.scp_port)})


def testdata(name: str) -> Path:
    """A file from pydicom-data (real radiographs RG1/RG3) or pydicom's own test files."""
    from pydicom.data import get_testdata_file

    p = get_testdata_file(name)
    if p is None:
        pytest.fail(f"test file {name} not found (pip install pydicom-data)")
    return Path(p)


# ------------------------------------------------------------------ markers from the fixtures a test uses
# so that `-m orthanc`, `-m "not postgres"` ... select every test that needs the thing, not a fraction
FIXTURE_MARKERS = {
    "orthanc": "orthanc", "orthanc_factory": "orthanc",
    "pg_database": "postgres", "pg_ctx": "postgres",
}
# a test module that needs torch/timm says so with pytest.importorskip (see tests/skip_allowlist.txt)
_WORKER_SOURCE = re.compile(r"""importorskip\(["'](torch|timm)["']\)""")
_module_needs_worker: dict[str, bool] = {}


def _needs_worker(item) -> bool:
    path = str(getattr(item, "path", ""))
    if path not in _module_needs_worker:
        try:
            _module_needs_worker[path] = bool(_WORKER_SOURCE.search(Path(path).read_text()))
        except OSError:
            _module_needs_worker[path] = False
    return _module_needs_worker[path]


def pytest_collection_modifyitems(config, items):
    for item in items:
        wanted = {FIXTURE_MARKERS[f] for f in getattr(item, "fixturenames", ()) if f in FIXTURE_MARKERS}
        callspec = getattr(item, "callspec", None)
        # db_url / any_ctx reach PostgreSQL through request.getfixturevalue: read the parameter
        if callspec is not None and callspec.params.get("db_url") == "postgresql":
            wanted.add("postgres")
        if _needs_worker(item):
            wanted.add("worker")
        for name in sorted(wanted - {m.name for m in item.iter_markers()}):
            item.add_marker(getattr(pytest.mark, name))


# ------------------------------------------------------------------ CI=true: a skip is a failure
# A test that skips proves nothing: in CI (CI=true) every skip fails the session unless its test is on
# tests/skip_allowlist.txt (one `nodeid-glob  # reason` per line).
SKIP_ALLOWLIST = Path(os.environ.get("RADCOHORT_SKIP_ALLOWLIST") or Path(__file__).with_name("skip_allowlist.txt"))
_skips: list[tuple[str, str]] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_allowlist(path: Path = SKIP_ALLOWLIST) -> list[tuple[str, str]]:
    """(nodeid glob, reason) pairs; an entry without a reason is an error."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1) if path.exists() else ():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, sep, reason = line.partition("#")
        if not sep or not reason.strip() or not pattern.strip():
            raise pytest.UsageError(f"{path.name}:{n}: expected `nodeid-glob  # reason`, got {line!r}")
        out.append((pattern.strip(), reason.strip()))
    return out


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    return str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        _skips.append((report.nodeid, _skip_reason(report)))


def pytest_collectreport(report):
    if report.skipped:  # a whole module skipped at import (module-level importorskip)
        _skips.append((report.nodeid, _skip_reason(report)))


def unexpected_skips(skips: list[tuple[str, str]], allow: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(nid, why) for nid, why in skips if not any(fnmatch.fnmatchcase(nid, pat) for pat, _ in allow)]


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    if not _in_ci() or not _skips:
        return
    bad = unexpected_skips(_skips, skip_allowlist())
    if bad:
        session.config._radcohort_bad_skips = bad
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bad = getattr(config, "_radcohort_bad_skips", None)
    if bad:
        terminalreporter.section("skips are failures in CI (CI=true)", red=True, bold=True)
        terminalreporter.write_line(f"{len(bad)} test(s) skipped that are not on {SKIP_ALLOWLIST.name}: "
                                    "install what they need (.ci/common.sh) or add them there with a reason")
        for nid, why in bad:
            terminalreporter.write_line(f"  {nid}: {why}")


@contextmanager
def listening_process(argv: list[str], env: dict, port: int, *, cwd: Path, what: str, timeout: float = 60.0):
    """Run `argv` (a radcohort server) until it listens on `port`; yield the Popen; stop it after.
    Its output goes to a file in `cwd` (a pipe nobody reads would block a chatty server)."""
    out = cwd / f"{what.replace(' ', '-')}-{port}.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"{what} exited: " + out.read_text(errors="replace")[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"{what} did not listen within {timeout:g} s"
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def tmpfs_mounted(mnt: Path, size: str):
    """A real tmpfs of `size` at `mnt` (a disk that fills up for real); needs root."""
    mnt.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root/CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
