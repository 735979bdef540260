"""The process's composition root: settings + engine + session factory, built once at start-up."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.config import Settings
from app.db.base import make_engine, make_sessionmaker


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    extras: dict = field(default_factory=dict)

    @classmethod
    def build(cls, settings: Settings) -> "AppContext":
        settings.ensure_dirs()
        engine = make_engine(settings.database_url)
        return cls(settings=settings, engine=engine, sessions=make_sessionmaker(engine))

    def close(self) -> None:
        self.engine.dispose()
