"""Typed settings: one class, built at start-up and passed in (never at import time)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All radcohort configuration, from `RADCOHORT_*` environment variables and `.env`."""

    # hide_input_in_errors: a start-up error must not print a token, key or database password
    model_config = SettingsConfigDict(env_prefix="RADCOHORT_", env_file=".env", extra="ignore",
                                      hide_input_in_errors=True)

    database_url: str = Field("sqlite:///./data/radcohort.db", description="SQLAlchemy URL")
    data_dir: Path = Field(Path("./data"), description="DICOM store, caches, model artifacts")
    ae_title: str = Field("RADCOHORT", max_length=16, description="our AE title (calling and SCP)")
    scp_host: str = "127.0.0.1"
    scp_port: int = Field(11112, ge=1, le=65535)
    scp_processes: int | None = Field(None, ge=1, le=64, description="Storage SCP receiving processes "
                                      "(default: one per core; associations of one process share a GIL)")
    scp_check_host: bool = Field(False, description="also require the peer host to match the node")
    scp_tls_cert: Path | None = Field(None, description="PEM certificate (chain): the SCP speaks TLS only")
    scp_tls_key: Path | None = Field(None, description="PEM private key of scp_tls_cert")
    scp_tls_ca: Path | None = Field(None, description="PEM CA bundle: require client certificates it signed")
    scp_handshake_timeout: float = Field(5.0, gt=0, description="seconds a new connection has to send its "
                                         "A-ASSOCIATE-RQ (TLS handshake included) before it is closed")
    scp_max_associations: int = Field(32, ge=1, description="associations of registered peers at once "
                                      "(per SCP process); connections before the AE check do not count")
    scp_max_pending_per_peer: int = Field(8, ge=1, description="connections not yet past the AE check per peer "
                                          "address; a new one closes that address's oldest")
    scp_max_pending: int = Field(256, ge=1, description="connections not yet past the AE check, all peers; "
                                 "a new one closes the oldest")
    scp_min_free_mb: int = Field(64, ge=0, description="refuse a C-STORE (0xA700) that would leave less free "
                                 "space than this on the store's filesystem")
    scp_partial_max_age_s: float = Field(300.0, gt=0, description="temp/partial receive files untouched this "
                                         "long are removed by the SCP's periodic sweep")
    health_min_free_mb: int = Field(1024, ge=0, description="/health reports storage not ok below this free space")
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_tokens: str | None = Field(None, description="comma-separated bearer tokens: `token` (all scopes but "
                                   "the identified ones) or `name:token:scope1+scope2` (see app/tokens.py)")
    login_max_failures: int = Field(10, ge=1, description="failed console sign-ins (/login) one client address "
                                    "may make in login_window_s; the next ones get 429 with Retry-After")
    login_window_s: int = Field(60, ge=1, description="the moving window of login_max_failures, seconds")
    api_max_body_kb: int = Field(1024, ge=1, description="largest request body of a JSON route, in KiB "
                                 "(upload routes: predict_max_upload_mb)")
    pseudonym_key: str | None = Field(None, description="HMAC key; generated once in DATA_DIR")
    dicom_timeout: float = Field(30.0, gt=0, description="ACSE/DIMSE timeout in seconds")
    dicom_retries: int = Field(3, ge=0, description="retries for retriable DICOM errors")
    # finite on purpose: pynetdicom holds a whole PDU in memory (about 4x its size at peak), so an
    # unlimited PDU let one pynetdicom sender of a 200 MB instance grow the SCP by 800 MB
    max_pdu: int = Field(1048576, ge=0, description="max receive PDU in bytes (0 = unlimited)")
    arrival_timeout: float = Field(30.0, gt=0, description="seconds to wait for stragglers after a C-MOVE")
    retrieval_heartbeat_s: float = Field(10.0, gt=0, description="how often a running retrieval renews its lease")
    retrieval_stale_s: float = Field(60.0, gt=0, description="a retrieval whose lease is this old was left "
                                     "by a stopped process: a running API takes it over")
    api_runs_jobs: bool = Field(True, description="the API process also runs background jobs (probes, pulls, "
                                "exports, worklist resolves, retrievals); false: only `radcohort worker` runs them")
    jobs_heartbeat_s: float = Field(5.0, gt=0, description="how often a job runner renews the leases of its jobs")
    jobs_stale_s: float = Field(30.0, gt=0, description="a job whose lease is this old was left by a stopped "
                                "runner: the next claim takes it over (retrieval jobs: retrieval_stale_s)")
    shared_node_limits: bool = Field(False, description="a node's max_associations, instances/min and MB/s "
                                     "limits are kept in the database and hold across every process retrieving "
                                     "from it (several workers or APIs); false: each process keeps its own")
    label_rules: Path | None = Field(None, description="labels rules file (YAML); built-in when unset")
    worker_poll_seconds: float = Field(2.0, gt=0)
    worker_gpus: int | None = Field(None, description="GPUs for one job (torchrun); all when unset")
    predict_max_upload_mb: int = Field(512, ge=1, description="largest DICOM accepted by /predict, in MB")
    predict_timeout_s: float = Field(300.0, gt=0, description="time limit of one prediction (loading the model "
                                     "included on a cold start, waiting behind other requests included): 504 past it")
    predict_idle_s: float = Field(600.0, ge=0, description="seconds a model's predictor process stays loaded after "
                                  "its last prediction (0: a fresh process per request)")
    predict_threads: int | None = Field(None, ge=1, description="torch threads of each predictor process "
                                        "(default: one per core)")
    predict_max_models: int = Field(2, ge=1, description="models the API keeps loaded at once (one predictor "
                                    "process each; the least recently used is closed first)")
    log_level: str = "INFO"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, v: str) -> str:
        v = v.strip()
        if not v or not all(32 <= ord(c) < 127 and c != "\\" for c in v):
            raise ValueError("AE title must be 1-16 printable ASCII characters")
        return v

    @model_validator(mode="after")
    def _lease(self) -> "Settings":
        if self.retrieval_stale_s < 2 * self.retrieval_heartbeat_s:
            raise ValueError("retrieval_stale_s must be at least twice retrieval_heartbeat_s "
                             "(a live retrieval would look stopped between two heartbeats)")
        if self.jobs_stale_s < 2 * self.jobs_heartbeat_s:
            raise ValueError("jobs_stale_s must be at least twice jobs_heartbeat_s "
                             "(a live job would look stopped between two heartbeats)")
        return self

    @model_validator(mode="after")
    def _scp_tls(self) -> "Settings":
        if (self.scp_tls_cert is None) != (self.scp_tls_key is None):
            raise ValueError("scp_tls_cert and scp_tls_key must be set together")
        if self.scp_tls_ca is not None and self.scp_tls_cert is None:
            raise ValueError("scp_tls_ca needs scp_tls_cert and scp_tls_key (client certificates need TLS)")
        return self

    @field_validator("api_tokens")
    @classmethod
    def _api_tokens(cls, v: str | None) -> str | None:
        from app.tokens import parse_tokens

        parse_tokens(v)  # a clear start-up error for a malformed entry or an unknown scope
        return v

    @property
    def tokens(self) -> list[str]:
        """The bearer secrets (plain and named entries alike)."""
        return [t.secret.decode() for t in self.api_token_entries]

    @property
    def api_token_entries(self):
        """Parsed tokens with their audit actor and scopes (app.tokens.ApiToken)."""
        from app.tokens import parse_tokens

        return parse_tokens(self.api_tokens)

    @property
    def scp_process_count(self) -> int:
        """Receiving processes of `serve`/`scp`: as configured, else one per core (at most 8)."""
        return self.scp_processes or max(1, min(8, os.cpu_count() or 1))

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    def ensure_dirs(self) -> None:
        for d in (self.data_dir, self.store_dir, self.cache_dir, self.runs_dir):
            d.mkdir(parents=True, exist_ok=True)

    def get_pseudonym_key(self) -> bytes:
        """The HMAC key: configured, or generated once and kept in DATA_DIR."""
        if self.pseudonym_key:
            return self.pseudonym_key.encode()
        path = self.data_dir / "pseudonym.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(32))
            tmp.chmod(0o600)
            try:
                tmp.rename(path) if not path.exists() else tmp.unlink()
            except FileExistsError:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip().encode()


def get_settings(**overrides) -> Settings:
    """Build settings from the environment (plus explicit overrides)."""
    return Settings(**overrides)
