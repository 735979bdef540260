"""Job kinds: each names its queue, the function that runs it, and how its own row is settled when the job
ends without the function finishing (cancelled while queued, its runners lost too often, a crash).

The built-in kinds call the existing service functions (imported when they run, so this module imports
no service at all); a test or a plug-in registers more with `register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from app.errors import InvalidInput

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from app.db.models import Job
    from app.jobs.runner import JobRun


@dataclass(frozen=True)
class Handler:
    kind: str
    queue: str
    run: Callable[["JobRun"], dict | None]  # returns the job's result (JSON); raises to fail it
    # (session, job, "failed"|"cancelled", error): mark the kind's own row, when still unfinished
    settle: Callable[["Session", "Job", str, str | None], None] | None = None
    # (session, job, actor): a cancel of a running job that the kind also passes on (a retrieval's own cancel)
    on_cancel: Callable[["Session", "Job", str], None] | None = None
    slots: int = 1  # jobs of this queue one runner runs at once (the largest of its kinds)


_HANDLERS: dict[str, Handler] = {}
# queue -> callables run by each runner serving it, every few seconds (e.g. adopt orphaned retrievals)
PERIODIC: dict[str, Callable[[Any], None]] = {}


def register(handler: Handler) -> Handler:
    _HANDLERS[handler.kind] = handler
    return handler


def find_handler(kind: str) -> Handler | None:
    _builtin()
    return _HANDLERS.get(kind)


def get_handler(kind: str) -> Handler:
    h = find_handler(kind)
    if h is None:
        raise InvalidInput(f"kind: no job kind {kind!r}")
    return h


def slots(queue: str) -> int:
    _builtin()
    return max([h.slots for h in _HANDLERS.values() if h.queue == queue] or [1])


def queues() -> list[str]:
    _builtin()
    return sorted({h.queue for h in _HANDLERS.values()})


_loaded = False


def _builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    from app.jobs import kinds  # noqa: F401 - registers the built-in kinds
