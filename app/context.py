"""The process's composition root: settings + engine + session factory, built once at start-up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.base import make_engine, make_sessionmaker
from app.privacy import install_log_redaction


T = TypeVar("T")


@dataclass
class AppContext:
    """Settings, engine and session factory of this process, and its process-wide objects.

    A process-wide object (the API's predictor pool, the policy's per-node limiters, the job runner)
    is keyed by its class: `ctx.shared(PredictorPool, factory)` returns a PredictorPool to the type
    checker and to the reader, where a bag of names returned Any. Whatever is registered and has
    `shutdown(wait=False)` is stopped by `close_shared()` (the API's shutdown)."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    # the registry: class -> its one object (no string keys: a bag of names returned Any)
    _shared: dict[type, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    _shared_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, settings: Settings) -> "AppContext":
        # every process that touches patient data builds a context: none logs an identifier
        install_log_redaction()
        settings.ensure_dirs()
        engine = make_engine(settings.database_url)
        return cls(settings=settings, engine=engine, sessions=make_sessionmaker(engine))

    def shared(self, kind: type[T], factory: Callable[[], T] | None = None) -> T:
        """The process's one object of class `kind`, made by `factory()` (default: `kind()`) on first use."""
        with self._shared_lock:
            obj = self._shared.get(kind)
            if obj is None:
                obj = self._shared[kind] = factory() if factory is not None else kind()
            return obj

    def existing(self, kind: type[T]) -> T | None:
        """The process's object of class `kind` if one was made (None: none yet)."""
        with self._shared_lock:
            return self._shared.get(kind)

    def close_shared(self) -> None:
        """Stop every registered object that can be stopped (`shutdown(wait=False)`)."""
        with self._shared_lock:
            objs = list(self._shared.values())
        for obj in objs:
            stop = getattr(obj, "shutdown", None)
            if callable(stop):
                stop(wait=False)

    def close(self) -> None:
        self.engine.dispose()
