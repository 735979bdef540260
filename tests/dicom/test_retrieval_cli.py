"""The CLI: nodes add/list/remove, echo, find, retrieve --with-scp, in-process against a real Orthanc."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from app.cli import cli
from tests.dicom.helpers import make_studies, upload_all


@pytest.fixture
def env(monkeypatch, settings):
    monkeypatch.setenv("RADCOHORT_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("RADCOHORT_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("RADCOHORT_SCP_PORT", str(settings.scp_port))
    monkeypatch.setenv("RADCOHORT_PSEUDONYM_KEY", "k")
    monkeypatch.setenv("RADCOHORT_ARRIVAL_TIMEOUT", "3")
    return settings


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_flow(env, orthanc, tmp_path):
    studies = make_studies(tmp_path / "gen", ["20120101", "20170101"], instances_per_series=3)
    upload_all(orthanc, sorted((tmp_path / "gen").iterdir()))
    r = run("nodes", "add", "pacs", "--ae-title", "ORTHANC", "--host", "127.0.0.1", "--port", str(orthanc.dicom_port))
    assert r.exit_code == 0, r.output
    assert run("nodes", "add", "pacs", "--ae-title", "ORTHANC", "--host", "127.0.0.1", "--port", "1").exit_code == 1
    assert "pacs\tORTHANC" in run("nodes", "list").output
    r = run("echo", "pacs")
    assert r.exit_code == 0 and "ok" in r.output
    r = run("find", "pacs", "--level", "STUDY", "-q", "StudyDate=20110101-20161231", "-q", "PatientName=", "--json")
    assert r.exit_code == 0, r.output
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["StudyInstanceUID"] for x in lines] == [studies[0].study_uid]
    assert "PatientName" not in lines[0] and "Test^Patient" not in r.output and "patient_key" in lines[0]

    r = run("retrieve", "pacs", "-q", "StudyDate=20110101-20161231", "--with-scp")
    assert r.exit_code == 0, r.output
    assert "completed — expected 3, received 3, skipped 0" in r.output
    r = run("retrieve", "pacs", "-q", "StudyDate=20110101-20171231", "--method", "get")
    assert r.exit_code == 0, r.output
    assert "completed — expected 6, received 3, skipped 3" in r.output
    assert run("nodes", "remove", "pacs").exit_code == 0
    assert run("nodes", "remove", "pacs").exit_code == 1


def test_cli_input_errors(env):
    r = run("nodes", "add", "x", "--ae-title", "WAY-TOO-LONG-AE-TITLE", "--host", "h", "--port", "99999")
    assert r.exit_code == 2 and "ae_title" in r.output and "port" in r.output
    r = run("echo", "nope")
    assert r.exit_code == 1 and "no PACS node named 'nope'" in r.output
    run("nodes", "add", "p", "--ae-title", "A", "--host", "127.0.0.1", "--port", "4242")
    r = run("find", "p", "-q", "NotAKeyword=1")
    assert r.exit_code == 1 and "query.NotAKeyword" in r.output
    r = run("retrieve", "p", "-q", "StudyDate")
    assert r.exit_code == 2 and "Keyword=Value" in r.output
