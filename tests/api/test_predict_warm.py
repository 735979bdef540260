"""POST /models/{id}/predict answered by a warm predictor process (one per model, owned by the API process):
one process serves every request, a crash is restarted, a slow answer is a 504 with a clear detail and a
fresh process next time, an idle process is closed, a bad image is a 422 that leaves the process up, a
missing torch is a 503, an unloadable checkpoint a 502, and deleting the model closes its process."""

from __future__ import annotations

import io
import os
import signal
import time

import pydicom
import pytest

from app.training import predict
from tests.factories.training import write_tiny_dicom

pytest.importorskip("torch")
pytest.importorskip("timm")
from tests.worker.test_scoring import fake_model  # noqa: E402

pytestmark = pytest.mark.worker


def _upload(client, mid: int, path, name: str = "q.dcm"):
    return client.post(f"/api/v1/models/{mid}/predict",
                       files={"file": (name, io.BytesIO(path.read_bytes()), "application/dicom")})


def _knee(tmp_path, name: str = "q.dcm", **kw):
    path = tmp_path / name
    write_tiny_dicom(path, "left", size=32, seed=7)
    ds = pydicom.dcmread(path)
    ds.BodyPartExamined = "KNEE"
    for k, v in kw.items():
        setattr(ds, k, v)
    ds.save_as(path)
    return path


def _loaded(client) -> list[dict]:
    pool = client.app.state.ctx.existing(predict.PredictorPool)
    return pool.status() if pool is not None else []


def test_one_warm_process_answers_every_request_and_a_crash_is_restarted(client, ctx, tmp_path):
    mid = fake_model(ctx)
    knee = _knee(tmp_path)
    first = _upload(client, mid, knee)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["class"] in ("CLeft", "CRight") and body["in_domain"] is True and body["warning"] is None
    (proc,) = _loaded(client)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        r = _upload(client, mid, knee)
        times.append(time.perf_counter() - t0)
        assert r.status_code == 200 and r.json()["probabilities"] == pytest.approx(body["probabilities"], abs=1e-6)
    (again,) = _loaded(client)
    assert again["pid"] == proc["pid"] and again["requests"] == 6  # the same process, loaded once
    assert min(times) < 2.0, times  # warm: no interpreter, torch or model load per request
    # outside the domain: still classified, flagged
    ct = _knee(tmp_path, "ct.dcm", Modality="CT")
    flagged = _upload(client, mid, ct).json()
    assert flagged["in_domain"] is False and "modality CT is not a radiograph" in flagged["warning"]
    # killed while idle (OOM killer, an operator): the next request gets a new process and an answer
    os.kill(proc["pid"], signal.SIGKILL)
    time.sleep(0.2)
    r = _upload(client, mid, knee)
    assert r.status_code == 200 and r.json()["class"] == body["class"]
    (fresh,) = _loaded(client)
    assert fresh["pid"] != proc["pid"]


def test_bad_image_is_422_and_the_process_stays(client, ctx, tmp_path):
    mid = fake_model(ctx)
    assert _upload(client, mid, _knee(tmp_path)).status_code == 200
    (proc,) = _loaded(client)
    bad = tmp_path / "bad.dcm"
    ds = pydicom.dcmread(_knee(tmp_path, "b.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"  # says JPEG baseline; the pixels are raw
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really a jpeg"])
    ds.save_as(bad)
    r = _upload(client, mid, bad)
    assert r.status_code == 422 and "cannot read the image" in r.json()["detail"], r.text
    assert _loaded(client)[0]["pid"] == proc["pid"]


def test_timeout_is_504_and_the_next_request_gets_a_fresh_process(client, ctx, tmp_path):
    mid = fake_model(ctx)
    knee = _knee(tmp_path)
    ctx.settings.predict_timeout_s = 0.001  # not even the load fits
    r = _upload(client, mid, knee)
    assert r.status_code == 504 and "took longer than the prediction time limit" in r.json()["detail"]
    assert _loaded(client) == []
    ctx.settings.predict_timeout_s = 120
    assert _upload(client, mid, knee).status_code == 200
    (proc,) = _loaded(client)
    ctx.settings.predict_timeout_s = 0.0005  # warm, but the answer cannot come this fast
    r = _upload(client, mid, knee)
    assert r.status_code == 504, r.text
    detail = r.json()["detail"]
    assert "prediction took longer than" in detail and "predictor process was stopped" in detail
    assert _loaded(client) == []
    ctx.settings.predict_timeout_s = 120
    assert _upload(client, mid, knee).status_code == 200
    assert _loaded(client)[0]["pid"] != proc["pid"]


def test_idle_process_is_closed_and_delete_closes_it_too(tmp_path):
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.context import AppContext
    from app.db.migrate import upgrade
    from tests.conftest import make_settings

    s = make_settings(tmp_path, predict_idle_s=1.0, predict_max_models=1)
    upgrade(s.database_url)
    c = AppContext.build(s)
    try:
        with TestClient(create_app(s, c)) as client:
            mid, other = fake_model(c), fake_model(c, seed=1)
            knee = _knee(tmp_path)
            assert _upload(client, mid, knee).status_code == 200
            (proc,) = _loaded(client)
            end = time.monotonic() + 20
            while _loaded(client) and time.monotonic() < end:
                time.sleep(0.2)
            assert _loaded(client) == [], "an idle predictor was not closed"
            assert _gone(proc["pid"])
            # one model at most: loading a second closes the first
            assert _upload(client, mid, knee).status_code == 200
            assert _upload(client, other, knee).status_code == 200
            assert [p["model_id"] for p in _loaded(client)] == [other]
            (loaded,) = _loaded(client)
            assert client.delete(f"/api/v1/models/{other}").status_code == 204
            assert _loaded(client) == [] and _gone(loaded["pid"])
        # the app's shutdown closes what is left
    finally:
        c.close()


def _gone(pid: int, wait: float = 5.0) -> bool:
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_unloadable_checkpoint_is_502_and_missing_torch_is_503(client, ctx, tmp_path, monkeypatch):
    mid = fake_model(ctx)
    knee = _knee(tmp_path)
    with ctx.sessions() as s:
        from app.db.models import TrainedModel

        path = ctx.settings.data_dir / s.get(TrainedModel, mid).path
    path.write_bytes(b"not really a model")
    r = _upload(client, mid, knee)
    assert r.status_code == 502 and f"model {mid} could not be loaded" in r.json()["detail"], r.text
    fake = tmp_path / "notorch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ImportError('no torch here')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    r = _upload(client, mid, knee)
    assert r.status_code == 503 and "[worker] extra" in r.json()["detail"], r.text


def test_pool_without_the_api(tmp_path, ctx):
    """The pool on its own: the protocol's ping, a crash while answering retried once, status and shutdown."""
    mid = fake_model(ctx)
    knee = _knee(tmp_path)
    pool = predict.PredictorPool(60, 2, tmp_path / "logs")
    with ctx.sessions() as s:
        from app.db.models import TrainedModel

        run_dir = (ctx.settings.data_dir / s.get(TrainedModel, mid).path).parent
    try:
        answer = pool.predict(mid, run_dir, knee, 120)
        assert set(answer) == {"class", "confidence", "probabilities"}
        slot = pool._slots[mid]
        assert slot.predictor.call({"op": "ping"}, time.monotonic() + 10)["ok"] is True
        # the process dies while answering (here: killed between request and answer): asked once more
        real_call = slot.predictor.call

        def dying(request, deadline):
            slot.predictor.proc.kill()
            slot.predictor.proc.wait()
            return real_call(request, deadline)

        slot.predictor.call = dying
        assert pool.predict(mid, run_dir, knee, 120)["class"] == answer["class"]
        assert pool.status()[0]["alive"] is True
    finally:
        pid = pool.status()[0]["pid"] if pool.status() else None
        pool.shutdown()
    assert pool.status() == [] and (pid is None or _gone(pid))
