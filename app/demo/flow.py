"""The demo's flow, driven ONLY through radcohort's public REST API (docs: /docs, shared contract v1).

register PACS node -> echo -> retrieve (poll) -> build cohort -> train (poll) -> metrics + report.
Every step checks its answer and raises FlowError with the server's `detail` when it is not what a
user would expect, so the demo (and the e2e test that runs it) fails loudly at the step that broke.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx


class FlowError(RuntimeError):
    """A REST step answered something other than what the contract promises."""


@dataclass
class FlowOptions:
    pacs_aet: str
    pacs_host: str
    pacs_port: int
    node_name: str = "demo-pacs"
    retrieve_method: str = "move"
    retrieval_query: dict[str, str] = field(default_factory=lambda: {"StudyDate": "19000101-29991231"})
    taxonomy: str = "xr10"
    cohort_per_class: int = 1500
    split: dict[str, float] = field(default_factory=lambda: {"train": 0.8, "test": 0.2})
    seed: int = 0
    training: dict[str, Any] = field(default_factory=dict)
    retrieval_timeout: float = 300.0
    training_timeout: float = 900.0
    poll_seconds: float = 1.0
    cancel_leftover_jobs: bool = False  # the demo's own DB: jobs an interrupted run left queued


@dataclass
class FlowResult:
    health: dict = field(default_factory=dict)
    node: dict = field(default_factory=dict)
    echo: dict = field(default_factory=dict)
    retrieval: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    cohort: dict = field(default_factory=dict)
    job: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    report: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _check(resp: httpx.Response, *expected: int, what: str) -> Any:
    if resp.status_code not in expected:
        try:
            detail = resp.json().get("detail")
        except ValueError:
            detail = resp.text[:500]
        raise FlowError(f"{what}: HTTP {resp.status_code} (expected {'/'.join(map(str, expected))}): {detail}")
    if resp.headers.get("content-type", "").startswith("application/json"):
        return resp.json()
    return resp.text


def _await(client: httpx.Client, url: str, status: int, timeout: float = 10.0) -> None:
    """Read-after-write: wait until GET url answers `status`.

    Why: a server may send its answer before its transaction is committed (FastAPI runs a yield
    dependency's exit code after the response by default), so the next request can see old state.
    """
    deadline = time.monotonic() + timeout
    while client.get(url).status_code != status:
        if time.monotonic() > deadline:
            raise FlowError(f"GET {url} did not answer {status} within {timeout:.0f} s of the write")
        time.sleep(0.05)


def _follow(client: httpx.Client, url: str, what: str, finished: tuple[str, ...], timeout: float, poll: float,
            show: Callable[[dict], None]) -> dict:
    """GET a job until its status is one of `finished`, passing every answer to `show`."""
    deadline = time.monotonic() + timeout
    while True:
        job = _check(client.get(url), 200, what=f"GET {what}")
        show(job)
        if job.get("status") in finished:
            return job
        if time.monotonic() > deadline:
            raise FlowError(f"{what} still {job.get('status')} after {timeout:.0f} s")
        time.sleep(poll)


def _fmt_pct(v: Any) -> str:
    if v is None:
        return "-"
    return f"{float(v):.1f}%"  # percentages, as everywhere in the API


def epoch_line(h: dict, epochs: Any) -> str:
    """One progress line for a history entry."""
    parts = [f"epoch {h.get('epoch')}/{epochs}"]
    if h.get("loss") is not None:
        parts.append(f"loss {float(h['loss']):.4f}")
    if h.get("train_accuracy") is not None:
        parts.append(f"train acc {_fmt_pct(h['train_accuracy'])}")
    if h.get("val_accuracy") is not None:
        parts.append(f"val acc {_fmt_pct(h['val_accuracy'])}")
    if h.get("images_per_second"):
        parts.append(f"{float(h['images_per_second']):.0f} img/s")
    return "  ".join(parts)


def run_flow(client: httpx.Client, opts: FlowOptions, say: Callable[[str], None] = print) -> FlowResult:
    """Drive the whole flow over REST; `client` has the API's base URL (and token, if any)."""
    res = FlowResult()
    t0 = time.monotonic()

    res.health = _check(client.get("/health"), 200, what="GET /health")
    if opts.cancel_leftover_jobs:
        for status in ("queued", "running"):
            left = _check(client.get("/api/v1/training-jobs", params={"status": status}), 200,
                          what="GET /api/v1/training-jobs")
            for job in left.get("items") or []:
                _check(client.post(f"/api/v1/training-jobs/{job['id']}/cancel"), 200, what="cancel a left-over job")
                say(f"cancelled training job {job['id']}, left {status} by an interrupted earlier run")

    # 1. the PACS node (re-created: the demo's Orthanc gets new ports on every run)
    name = opts.node_name
    existing = client.get(f"/api/v1/pacs-nodes/{name}")
    if existing.status_code == 200:
        _check(client.delete(f"/api/v1/pacs-nodes/{name}"), 200, 204, what=f"DELETE pacs-node {name}")
        _await(client, f"/api/v1/pacs-nodes/{name}", 404)
    res.node = _check(client.post("/api/v1/pacs-nodes", json={
        "name": name, "ae_title": opts.pacs_aet, "host": opts.pacs_host, "port": opts.pacs_port,
        "retrieve_method": opts.retrieve_method}), 201, what="POST /api/v1/pacs-nodes")
    _await(client, f"/api/v1/pacs-nodes/{name}", 200)
    say(f"registered PACS node {name!r}: {opts.pacs_aet}@{opts.pacs_host}:{opts.pacs_port} "
        f"({opts.retrieve_method})")

    # 2. echo
    res.echo = _check(client.post(f"/api/v1/pacs-nodes/{name}/echo"), 200, what="C-ECHO")
    if not res.echo.get("ok"):
        raise FlowError(f"C-ECHO answered {res.echo}")
    say(f"C-ECHO ok in {float(res.echo.get('elapsed_ms', 0)):.0f} ms")

    # 3. retrieve (C-MOVE/C-GET into our SCP) and wait until every expected instance is stored and indexed
    t = time.monotonic()
    job = _check(client.post("/api/v1/retrievals", json={"node": name, "query": opts.retrieval_query}),
                 202, what="POST /api/v1/retrievals")
    rid = job["id"]
    last = None

    def show_retrieval(job: dict) -> None:
        nonlocal last
        state = (job.get("status"), job.get("expected"), job.get("received"), job.get("skipped"))
        if state != last:
            say(f"retrieval {rid}: {job.get('status')}  expected {job.get('expected')}  "
                f"received {job.get('received')}  skipped {job.get('skipped')}  failed {job.get('failed')}")
            last = state

    job = _follow(client, f"/api/v1/retrievals/{rid}", f"retrieval {rid}", ("completed", "partial", "failed"),
                  opts.retrieval_timeout, opts.poll_seconds, show_retrieval)
    res.retrieval = job
    res.timings["retrieve"] = time.monotonic() - t
    if job["status"] != "completed":
        missing = job.get("missing") or []
        raise FlowError(f"retrieval {rid} ended {job['status']}: {job.get('error')}; "
                        f"{len(missing)} missing, e.g. {missing[:3]}")
    res.stats = _check(client.get("/api/v1/stats"), 200, what="GET /api/v1/stats")
    say(f"index: {_stats_line(res.stats)}")

    # 4. the cohort: a frozen snapshot, one image per patient, patient-level split
    body = {"taxonomy": opts.taxonomy, "per_class": opts.cohort_per_class, "split": opts.split,
            "seed": opts.seed}
    res.cohort = _check(client.post("/api/v1/cohorts", json=body), 201, what="POST /api/v1/cohorts")
    _await(client, f"/api/v1/cohorts/{res.cohort['id']}", 200)
    classes = res.cohort.get("classes") or []
    say(f"cohort {res.cohort.get('id')} ({opts.taxonomy}): " + ", ".join(
        f"{c.get('name')} {c.get('train', 0)}/{c.get('test', 0)}" for c in classes) + "  (train/test)")
    excluded = {k: v for k, v in (res.cohort.get("excluded") or {}).items() if v}
    if excluded:
        say("excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(excluded.items())))
    if not classes or sum(c.get("train", 0) for c in classes) == 0:
        raise FlowError(f"cohort has no training images: {res.cohort}")
    thin = [c.get("name") for c in classes if not c.get("train") or not c.get("test")]
    if thin:
        say(f"warning: no train or no test images for {', '.join(map(str, thin))} (more --per-class helps)")

    # 5. training, polled until done
    t = time.monotonic()
    body = {"cohort_id": res.cohort["id"], **opts.training}
    job = _check(client.post("/api/v1/training-jobs", json=body), 202, what="POST /api/v1/training-jobs")
    jid = job["id"]
    say(f"training job {jid} queued: " + ", ".join(f"{k}={v}" for k, v in opts.training.items()))
    shown_epochs: set = set()
    last_status = last_pre = None

    def show_training(job: dict) -> None:
        nonlocal last_status, last_pre
        if job.get("status") != last_status:
            say(f"training job {jid}: {job.get('status')}" + (f" on {job['device']}" if job.get("device") else ""))
            last_status = job.get("status")
        pre = job.get("preprocess")
        if pre and pre != last_pre and pre.get("total"):
            say(f"  preprocessing {pre.get('done')}/{pre.get('total')}")
            last_pre = pre
        for h in job.get("history") or []:
            if h.get("epoch") not in shown_epochs:
                shown_epochs.add(h.get("epoch"))
                say("  " + epoch_line(h, job.get("epochs")))

    job = _follow(client, f"/api/v1/training-jobs/{jid}", f"training job {jid}", ("completed", "failed", "cancelled"),
                  opts.training_timeout, opts.poll_seconds, show_training)
    res.job = job
    res.timings["train"] = time.monotonic() - t
    if job["status"] != "completed":
        raise FlowError(f"training job {jid} ended {job['status']}: {job.get('error')}")

    # 6. results
    res.metrics = _check(client.get(f"/api/v1/training-jobs/{jid}/metrics"), 200, what="GET metrics")
    rep = client.get(f"/api/v1/training-jobs/{jid}/report")
    res.report = rep.text if rep.status_code == 200 else None
    res.timings["flow"] = time.monotonic() - t0
    return res


def _stats_line(stats: dict) -> str:
    keys = ("patients", "studies", "series", "instances")
    parts = [f"{stats[k]} {k}" for k in keys if isinstance(stats.get(k), int)]
    return ", ".join(parts) or str({k: v for k, v in stats.items() if not isinstance(v, dict)})
