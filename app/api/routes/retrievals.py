"""Retrievals: create (runs in the background), get, list newest first."""

from __future__ import annotations

from fastapi import APIRouter, Query

from app.api.deps import ActorDep, CtxDep, SessionDep
from app.jobs.runner import wake_after_commit
from app.policy import service as control
from app.retrievals import service
from app.retrievals.nodes import get_node
from app.retrievals.schemas import RetrievalCreated, RetrievalIn, RetrievalList, RetrievalOut

router = APIRouter(prefix="/retrievals", tags=["retrievals"])


@router.post("", status_code=202, response_model=RetrievalCreated,
             responses={404: {"description": "unknown node"}, 422: {"description": "invalid query"}})
def create_retrieval(body: RetrievalIn, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """Queue a retrieval: image-level C-FIND -> C-MOVE/C-GET of what is not indexed yet -> report.

    Poll `GET /api/v1/retrievals/{id}`; `completed` only when every expected instance is in the
    store and index. Instances already indexed count as `skipped` and are not fetched again."""
    r = service.create_retrieval(session, body.node, body.query, actor)
    if body.urgent:
        control.mark_urgent(session, r, get_node(session, body.node), actor)
    service.queue_retrieval(session, r.id, actor)  # a durable job (app.jobs), committed with the row
    wake_after_commit(ctx, session)
    return RetrievalCreated(id=r.id, status=r.status)


@router.get("", response_model=RetrievalList)
def list_retrievals(session: SessionDep, limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)):
    rows, total = service.list_retrievals(session, limit, offset)
    return RetrievalList(items=[service.to_out(r) for r in rows], total=total)


@router.get("/{retrieval_id}", response_model=RetrievalOut, responses={404: {"description": "unknown retrieval"}})
def get_retrieval(retrieval_id: int, session: SessionDep):
    return service.to_out(service.get_retrieval(session, retrieval_id))


@router.post("/{retrieval_id}/retry", status_code=202, response_model=RetrievalCreated,
             responses={404: {"description": "unknown retrieval"}, 409: {"description": "still queued or running"}})
def retry_retrieval(retrieval_id: int, session: SessionDep, ctx: CtxDep, actor: ActorDep):
    """Run a finished retrieval again (same node and query): only what is not indexed is fetched."""
    r = service.requeue_retrieval(session, retrieval_id, actor)
    service.queue_retrieval(session, r.id, actor)
    wake_after_commit(ctx, session)
    return RetrievalCreated(id=r.id, status=r.status)


_CONTROL = {404: {"description": "unknown retrieval"}, 409: {"description": "not in a state that allows it"}}


@router.post("/{retrieval_id}/pause", response_model=RetrievalOut, responses=_CONTROL)
def pause_retrieval(retrieval_id: int, session: SessionDep, actor: ActorDep):
    """Pause: a running retrieval stops at its next study/series boundary; a queued one waits."""
    return service.to_out(control.pause(session, service.get_retrieval(session, retrieval_id), actor))


@router.post("/{retrieval_id}/resume", response_model=RetrievalOut, responses=_CONTROL)
def resume_retrieval(retrieval_id: int, session: SessionDep, actor: ActorDep):
    return service.to_out(control.resume(session, service.get_retrieval(session, retrieval_id), actor))


@router.post("/{retrieval_id}/cancel", response_model=RetrievalOut, responses=_CONTROL)
def cancel_retrieval(retrieval_id: int, session: SessionDep, actor: ActorDep):
    """Cancel: it stops at its next boundary and ends `cancelled` with what it got so far."""
    return service.to_out(control.cancel(session, service.get_retrieval(session, retrieval_id), actor))
