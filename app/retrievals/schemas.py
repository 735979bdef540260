"""Request/response shapes for PACS nodes, queries and retrievals (used by the API and CLI)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _check_ae_title(v: str) -> str:
    v = v.strip()
    if not v or len(v) > 16 or not all(32 <= ord(c) < 127 and c != "\\" for c in v):
        raise ValueError("AE title must be 1-16 printable ASCII characters (no backslash)")
    return v


def check_host(v: str) -> str:
    """An IP address or a host name the socket layer can encode (IDNA: labels of 1-63 characters)."""
    import ipaddress

    try:
        ipaddress.ip_address(v)
        return v
    except ValueError:
        pass
    if ":" in v:
        raise ValueError(f"host {v!r}: ':' only in an IPv6 address")
    if len(v.rstrip(".")) > 253:
        raise ValueError("host: a host name has at most 253 characters")
    for label in v.rstrip(".").split("."):
        if not 1 <= len(label) <= 63:
            raise ValueError(f"host {v!r}: each dot-separated label must have 1-63 characters")
    try:
        v.encode("idna")
    except UnicodeError as exc:
        raise ValueError(f"host {v!r}: not a valid host name ({exc})") from None
    return v


class NodeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                      description="unique node name: letters, digits, '.', '_' or '-'")
    ae_title: str = Field(..., description="the PACS's AE title (1-16 printable ASCII)")
    host: str = Field(..., min_length=1, max_length=255, pattern=r"^[A-Za-z0-9.:_-]+$",
                      description="host name or IP address")
    port: int = Field(..., ge=1, le=65535)
    retrieve_method: Literal["move", "get"] = Field("move", description="C-MOVE to our SCP, or C-GET")
    find_limit: int | None = Field(None, ge=1, description="the PACS's C-FIND result limit when it truncates "
                                   "answers silently (no 0xFE00): an answer this long is treated as capped")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        return check_host(v)


class NodeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    ae_title: str
    host: str
    port: int
    retrieve_method: str
    find_limit: int | None = None
    created_at: datetime | None = None

    @classmethod
    def of(cls, node) -> "NodeOut":
        return cls(name=node.name, ae_title=node.ae_title, host=node.host, port=node.port,
                   retrieve_method=node.retrieve_method, find_limit=(node.options or {}).get("find_limit"),
                   created_at=node.created_at)


class EchoOut(BaseModel):
    ok: bool
    elapsed_ms: float


class FindIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    level: Literal["PATIENT", "STUDY", "SERIES", "IMAGE"] = "STUDY"
    root: Literal["study", "patient"] = Field("study", description="Q/R information model; PATIENT level needs 'patient'")
    query: dict[str, str | int | None] = Field(
        default_factory=dict,
        description="DICOM keyword -> matching value ('' or null asks for the key to be returned). "
                    "Ranges for dates ('20110101-20161231'), '*'/'?' wildcards for strings.")


class FindOut(BaseModel):
    results: list[dict[str, Any]]
    count: int
    capped: bool = Field(description="the PACS stopped at its result limit: the list is incomplete")
    withheld: list[str] = Field(description="keys never returned (patient identifiers); results carry "
                                            "'patient_key', an HMAC pseudonym of PatientID, instead")


class RetrievalIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    node: str = Field(..., min_length=1, max_length=64)
    query: dict[str, str | int | None] = Field(
        ..., description="DICOM keyword -> value, e.g. {'StudyDate': '20110101-20161231', 'Modality': 'CR'}")
    urgent: bool = Field(False, description="run outside the node's transfer windows (if its policy allows; audited)")


class RetrievalCreated(BaseModel):
    id: int
    status: str


class RetrievalOut(BaseModel):
    id: int
    node: str
    query: dict[str, Any]
    method: str | None
    status: Literal["queued", "running", "paused", "completed", "partial", "failed", "cancelled"]
    expected: int = Field(description="instances the C-FIND listed")
    received: int = Field(description="fetched by this run and now in store and index")
    skipped: int = Field(description="already in store and index before this run")
    failed: int = Field(description="not in store: the PACS reported the sub-operation failed or refused the retrieve")
    missing: list[str] = Field(description="SOPInstanceUIDs expected but not in store and index (failed ones included)")
    error: str | None
    report: dict[str, Any]
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class RetrievalList(BaseModel):
    items: list[RetrievalOut]
    total: int
