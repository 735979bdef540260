"""The probe's API answers: the stored findings (ProbeOut) plus the background job's state."""

from __future__ import annotations

from pydantic import BaseModel, Field

from app.policy.schema import ProbeOut


class ProbeJobState(BaseModel):
    status: str = Field(description="never | running | completed | failed")
    started_at: str | None = None
    finished_at: str | None = None
    error: str | None = Field(None, description="why the last probe failed (e.g. no answer to C-ECHO)")
    summary: str | None = Field(None, description="the last probe's one-line verdict")
    job_id: int | None = Field(None, description="its durable job (GET /api/v1/jobs/{job_id}), when run as one")


class ProbeJobOut(ProbeOut):
    """`capabilities` and `planner` as of the last completed probe; `probe` is the job in progress or
    last run."""

    summary: str | None = Field(None, description="one line: 'echo ok, query ok (STUDY/SERIES/IMAGE), move ok, "
                                                  "get refused, result cap 500, keys not honoured: ...'")
    probe: ProbeJobState
