"""Database plumbing: declarative base, engine and session factories (built per process)."""

from app.db.base import Base, make_engine, make_sessionmaker, session_scope

__all__ = ["Base", "make_engine", "make_sessionmaker", "session_scope"]
