"""PACS nodes: register, list, delete, C-ECHO and C-FIND (thin: parse -> service -> schema).

Find results never carry patient identifiers (PatientName, PatientID, birth date, accession number
...): they are withheld and replaced by `patient_key`, the same HMAC pseudonym the cohort exports
use; matching on one needs the `find-identified` scope (app.find_policy).
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel

from app import audit
from app.api.deps import ActorDep, CtxDep, SessionDep, SettingsDep, has_scope
from app.db.base import session_scope
from app.find_policy import IDENTIFIED_SCOPE, WITHHELD, answer_rows, identifying_match_keys, refusal_detail
from app.policy import service as policy
from app.policy.schema import NodePatch, NodeSettingsOut
from app.probe.schemas import ProbeJobOut
from app.jobs.runner import wake_after_commit
from app.probe.service import mark_running, probe_and_store, queue_probe, summary as probe_summary
from app.dicom.scu import DicomClient
from app.retrievals import nodes
from app.errors import PermanentDicomError, RadcohortError
from app.retrievals.schemas import EchoOut, FindIn, FindOut, NodeIn, NodeOut, check_host

router = APIRouter(prefix="/pacs-nodes", tags=["pacs"])

_ERRORS = {404: {"description": "unknown node"}, 502: {"description": "the PACS refused or failed"},
           504: {"description": "the PACS is unreachable or timed out"}}


def _gateway(name: str, node, call):
    """Run a DICOM call on `node`; a stored host that cannot be encoded (registered before the schema
    checked it: 'a..b', a 64+ character label) is a clear 502, not a UnicodeError 500."""
    try:
        check_host(node.host)
    except ValueError as exc:
        raise PermanentDicomError(f"node {name}: {exc}; register the node again with a valid host") from None
    try:
        return call()
    except UnicodeError as exc:  # IDNA encoding inside the socket layer
        raise PermanentDicomError(f"node {name}: host {node.host!r} cannot be encoded ({exc})") from None


@router.post("", status_code=201, response_model=NodeOut, responses={409: {"description": "duplicate name"}})
def create_node(body: NodeIn, session: SessionDep, actor: ActorDep, ctx: CtxDep,
                probe: bool = Query(False, description="probe its capabilities in the background once "
                                                      "created (C-ECHO, C-FIND levels, one test C-GET/C-MOVE)")):
    """Register a PACS node (its AE title is then also accepted by our Storage SCP)."""
    node = nodes.create_node(session, body, actor)
    if probe:  # a durable job (app.jobs), committed with the node
        queue_probe(session, body.name, actor)
        wake_after_commit(ctx, session)
    return NodeOut.of(node)


class NodeList(BaseModel):
    total: int
    items: list[NodeOut]


@router.get("", response_model=NodeList)
def list_nodes(session: SessionDep, limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0)):
    """By name; the same {total, items} page as every list."""
    all_nodes = nodes.list_nodes(session)
    return NodeList(total=len(all_nodes), items=[NodeOut.of(n) for n in all_nodes[offset:offset + limit]])


@router.get("/{name}", response_model=NodeOut, responses={404: _ERRORS[404]})
def get_node(name: str, session: SessionDep):
    return NodeOut.of(nodes.get_node(session, name))


@router.delete("/{name}", status_code=204, responses={404: _ERRORS[404]})
def delete_node(name: str, session: SessionDep, actor: ActorDep):
    nodes.delete_node(session, name, actor)
    return Response(status_code=204)


@router.post("/{name}/echo", response_model=EchoOut, responses=_ERRORS)
def echo(name: str, session: SessionDep, settings: SettingsDep, ctx: CtxDep, actor: ActorDep):
    """C-ECHO the node; 504 when unreachable, 502 when it refuses us. The verdict is kept as the node's
    last echo (the console's overview shows it), a failure too."""
    node = nodes.get_node(session, name)
    # interactive: at most one retry, so an unreachable node answers in seconds, not minutes
    client = DicomClient(settings, node, retries=min(settings.dicom_retries, 1))
    try:
        elapsed = _gateway(name, node, client.echo)
    except RadcohortError as exc:
        # the request's session rolls back with the error: the failure is kept in a session of its own
        with session_scope(ctx.sessions) as s:
            nodes.remember_echo(s, nodes.get_node(s, name), ok=False, error=exc.message, actor=actor)
        raise
    nodes.remember_echo(session, node, ok=True, elapsed_ms=elapsed, actor=actor)
    return EchoOut(ok=True, elapsed_ms=round(elapsed, 2))


@router.post("/{name}/find", response_model=FindOut,
             responses={**_ERRORS, 403: {"description": "an identifying matching key without the scope "
                                                        "'find-identified' (field-level detail)"}})
def find(name: str, body: FindIn, request: Request, session: SessionDep, settings: SettingsDep, actor: ActorDep,
         ctx: CtxDep):
    """C-FIND on the node, pseudonymous: identifying attributes (PatientName, PatientID, birth date,
    accession number, other IDs ...) are never in an answer, and matching on one needs a token with the
    scope `find-identified`; such a search is audited (key names, never their values)."""
    node = nodes.get_node(session, name)
    identifying = identifying_match_keys(body.query)
    if identifying:
        if not has_scope(request, IDENTIFIED_SCOPE):
            raise HTTPException(status_code=403, detail=refusal_detail(identifying))
        # committed on its own, before the query: the attempt is on record even if the PACS fails
        with session_scope(ctx.sessions) as s:
            audit.record(s, actor, "pacs.find_identified", name, level=body.level, keys=identifying)
    res = _gateway(name, node, lambda: DicomClient(settings, node).find(body.level, body.query, root=body.root))
    key = settings.get_pseudonym_key()
    results = answer_rows(res.results, body.level, key)
    return FindOut(results=results, count=len(results), capped=res.capped, withheld=sorted(WITHHELD))


def _settings_out(node) -> NodeSettingsOut:
    return NodeSettingsOut(**NodeOut.of(node).model_dump(include={"name", "ae_title", "host", "port",
                                                                   "retrieve_method"}),
                           **policy.node_settings(node))


@router.get("/{name}/policy", response_model=NodeSettingsOut, responses={404: _ERRORS[404]})
def get_node_policy(name: str, session: SessionDep):
    """The node's etiquette: transfer windows (open now?), limits, protocol, what the planner will do."""
    return _settings_out(nodes.get_node(session, name))


@router.patch("/{name}", response_model=NodeSettingsOut,
              responses={404: _ERRORS[404], 422: {"description": "invalid policy (field-level detail)"}})
def patch_node(name: str, body: NodePatch, session: SessionDep, actor: ActorDep):
    """Edit a node's policy (windows, limits, backoff, urgent rules), protocol and DICOMweb URL.

    `policy` replaces the stored policy as a whole; omitted fields keep their value."""
    return _settings_out(policy.patch_node(session, nodes.get_node(session, name), body, actor))


@router.post("/{name}/probe", response_model=ProbeJobOut, status_code=202,
             responses={**_ERRORS, 200: {"description": "with wait=true: the probe ran in the request"}})
def probe_node(name: str, session: SessionDep, settings: SettingsDep, actor: ActorDep, ctx: CtxDep,
               response: Response,
               wait: bool = Query(False, description="probe within the request (up to ~90 s) and answer 200")):
    """Probe the node in the background (C-ECHO, C-FIND levels/models, result cap, which matching keys it
    honours, UID lists, C-GET and storage syntaxes, whether we are a known C-MOVE destination; nothing is
    stored) and keep the findings for the planner. 202 with `probe.status` "running": poll
    GET /pacs-nodes/{name}/probe for the outcome and its one-line `summary`."""
    node = nodes.get_node(session, name)
    if wait:
        out = _gateway(name, node, lambda: probe_and_store(session, settings, node, actor))
        if not out["capabilities"].get("echo", {}).get("ok"):
            from app.errors import RetriableDicomError

            raise RetriableDicomError(f"probe of {name}: no answer to C-ECHO "
                                      f"({out['capabilities'].get('echo', {}).get('error')})")
        response.status_code = 200
        return probe_summary(node)
    _gateway(name, node, lambda: None)  # a host that cannot be encoded is a 502 now, not a failed job
    if mark_running(node):  # one probe at a time per node: a second request reports the running one
        queue_probe(session, name, actor)
        wake_after_commit(ctx, session)
    return probe_summary(node)


@router.get("/{name}/probe", response_model=ProbeJobOut, responses={404: _ERRORS[404]})
def get_probe(name: str, session: SessionDep):
    """The node's last probe: job status, its one-line summary and the capabilities it found."""
    return probe_summary(nodes.get_node(session, name))
