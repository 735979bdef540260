"""The per-node policy as stored in `PacsNode.options["policy"]`, validated with pydantic."""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.policy.backoff import BackoffConfig
from app.policy.windows import Schedule, parse_hhmm

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class WindowIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    days: list[Day] = Field(..., min_length=1, description="weekdays the window STARTS on")
    start: str = Field(..., description="HH:MM local time")
    end: str = Field(..., description="HH:MM local time; at or before start = runs past midnight; 24:00 = end of day")

    @field_validator("start", "end")
    @classmethod
    def _hhmm(cls, v: str) -> str:
        parse_hhmm(v)
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> "WindowIn":
        if parse_hhmm(self.start) == 1440:
            raise ValueError("start must be before 24:00")
        return self


class BackoffIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    initial_s: float = Field(1.0, gt=0, le=3600, description="delay after the first pushback")
    factor: float = Field(2.0, ge=1, le=10)
    max_s: float = Field(300.0, gt=0, le=86400)
    recover_after: int = Field(3, ge=1, le=1000, description="successful retrieves per step back")
    decay_s: float = Field(60.0, ge=0, le=86400, description="seconds without pushback per step back "
                           "(0: only successes lower the level)")

    def config(self) -> BackoffConfig:
        return BackoffConfig(self.initial_s, self.factor, self.max_s, self.recover_after, self.decay_s)


class UrgentRules(BaseModel):
    model_config = ConfigDict(extra="forbid")

    allowed: bool = Field(True, description="may a retrieval be marked urgent at all")
    bypass_windows: bool = Field(True, description="an urgent retrieval runs outside the transfer windows")
    bypass_rate_limits: bool = Field(False, description="an urgent retrieval ignores instances/min and MB/s")


class NodePolicy(BaseModel):
    """How hard and when radcohort may pull from one PACS."""

    model_config = ConfigDict(extra="forbid")

    timezone: str = Field("UTC", max_length=64, description="IANA zone of the windows, e.g. 'Asia/Tokyo'")
    windows: list[WindowIn] = Field(default_factory=list, max_length=64,
                                    description="transfer windows; empty = always open")
    max_associations: int = Field(2, ge=1, le=64, description="concurrent associations to this node")
    instances_per_minute: float | None = Field(None, gt=0, le=1e7, description="token bucket; null = unlimited")
    mb_per_second: float | None = Field(None, gt=0, le=1e5, description="token bucket on received bytes; null = unlimited")
    max_find_results: int | None = Field(
        None, ge=1, le=10_000_000, description="treat a C-FIND answer with this many results as capped (a PACS that truncates "
                                "silently); the probe fills it in when it detects a cap")
    backoff: BackoffIn = Field(default_factory=BackoffIn)
    urgent: UrgentRules = Field(default_factory=UrgentRules)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: a name too long for a path
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as 'Europe/Berlin')") from None
        return v

    def schedule(self) -> Schedule:
        return Schedule.from_policy([w.model_dump() for w in self.windows], self.timezone)


Protocol = Literal["dimse", "dicomweb", "both"]


class NodePatch(BaseModel):
    """PATCH /api/v1/pacs-nodes/{name}: any subset; `policy` replaces the stored policy as a whole."""

    model_config = ConfigDict(extra="forbid")

    policy: NodePolicy | None = None
    protocol: Protocol | None = Field(None, description="dimse (C-MOVE/C-GET), dicomweb (QIDO/WADO-RS), or both "
                                                        "(listing and retrieval over DICOMweb, echo/probe over DIMSE too)")
    dicomweb_url: str | None = Field(None, max_length=1024, pattern=r"^https?://[^\s]+$",
                                     description="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    retrieve_method: Literal["move", "get"] | None = None


def policy_of(options: dict | None) -> NodePolicy:
    """The node's policy (defaults when none stored)."""
    raw = (options or {}).get("policy") or {}
    return NodePolicy.model_validate(raw)


def protocol_of(options: dict | None) -> str:
    return (options or {}).get("protocol") or "dimse"


class WindowState(BaseModel):
    open: bool
    changes_at: datetime | None = Field(None, description="when it closes (if open) or opens (if closed); null = never")


class PlannerOut(BaseModel):
    method: str = Field(description="how retrievals will run: move, get or dicomweb")
    method_reason: str | None = Field(None, description="why it differs from the node's retrieve_method")
    find_cap: int | None = Field(None, description="C-FIND answers this long are treated as capped")


class NodeSettingsOut(BaseModel):
    """A node with its etiquette (GET /pacs-nodes/{name}/policy, PATCH /pacs-nodes/{name})."""

    name: str
    ae_title: str
    host: str
    port: int
    retrieve_method: str
    protocol: str
    dicomweb_url: str | None
    policy: NodePolicy
    window: WindowState
    planner: PlannerOut
    capabilities: dict | None = Field(None, description="the last probe's findings")


class ProbeOut(BaseModel):
    capabilities: dict
    planner: PlannerOut
