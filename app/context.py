"""The process's composition root: settings + engine + session factory, built once at start-up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.base import make_engine, make_sessionmaker
from app.privacy import install_log_redaction


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    extras: dict = field(default_factory=dict)
    _extras_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def build(cls, settings: Settings) -> "AppContext":
        # every process that touches patient data builds a context: none logs an identifier
        install_log_redaction()
        settings.ensure_dirs()
        engine = make_engine(settings.database_url)
        return cls(settings=settings, engine=engine, sessions=make_sessionmaker(engine))

    def shared(self, name: str, factory: Callable[[], Any]) -> Any:
        """The process's one `name` object (a background pool ...), made by `factory()` on first use
        and kept in `extras`, where the API's shutdown finds it."""
        with self._extras_lock:
            obj = self.extras.get(name)
            if obj is None:
                obj = self.extras[name] = factory()
            return obj

    def close(self) -> None:
        self.engine.dispose()
