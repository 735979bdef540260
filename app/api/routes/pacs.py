"""PACS nodes: register, list, delete, C-ECHO and C-FIND (thin: parse -> service -> schema).

Find results never carry patient identifiers (PatientName, PatientID, ...): they are withheld and
replaced by `patient_key`, the same HMAC pseudonym the cohort exports use.
"""

from __future__ import annotations

from fastapi import APIRouter, Query, Response
from sqlalchemy import event

from app.api.deps import ActorDep, CtxDep, SessionDep, SettingsDep
from app.policy import service as policy
from app.policy.schema import NodePatch, NodeSettingsOut, ProbeOut
from app.probe.service import probe_and_store, probe_in_background
from app.cohorts.service import patient_key
from app.dicom.queries import PATIENT_IDENTIFIERS, result_to_dict
from app.dicom.scu import DicomClient
from app.retrievals import nodes
from app.retrievals.schemas import EchoOut, FindIn, FindOut, NodeIn, NodeOut

router = APIRouter(prefix="/pacs-nodes", tags=["pacs"])

_ERRORS = {404: {"description": "unknown node"}, 502: {"description": "the PACS refused or failed"},
           504: {"description": "the PACS is unreachable or timed out"}}


@router.post("", status_code=201, response_model=NodeOut, responses={409: {"description": "duplicate name"}})
def create_node(body: NodeIn, session: SessionDep, actor: ActorDep, ctx: CtxDep,
                probe: bool = Query(False, description="probe its capabilities in the background once "
                                                      "created (C-ECHO, C-FIND levels, one test C-GET/C-MOVE)")):
    """Register a PACS node (its AE title is then also accepted by our Storage SCP)."""
    node = nodes.create_node(session, body, actor)
    if probe:
        event.listen(session, "after_commit", lambda _s: probe_in_background(ctx, body.name), once=True)
    return NodeOut.of(node)


@router.get("", response_model=list[NodeOut])
def list_nodes(session: SessionDep):
    return [NodeOut.of(n) for n in nodes.list_nodes(session)]


@router.get("/{name}", response_model=NodeOut, responses={404: _ERRORS[404]})
def get_node(name: str, session: SessionDep):
    return NodeOut.of(nodes.get_node(session, name))


@router.delete("/{name}", status_code=204, responses={404: _ERRORS[404]})
def delete_node(name: str, session: SessionDep, actor: ActorDep):
    nodes.delete_node(session, name, actor)
    return Response(status_code=204)


@router.post("/{name}/echo", response_model=EchoOut, responses=_ERRORS)
def echo(name: str, session: SessionDep, settings: SettingsDep):
    """C-ECHO the node; 504 when unreachable, 502 when it refuses us."""
    node = nodes.get_node(session, name)
    # interactive: at most one retry, so an unreachable node answers in seconds, not minutes
    client = DicomClient(settings, node, retries=min(settings.dicom_retries, 1))
    return EchoOut(ok=True, elapsed_ms=round(client.echo(), 2))


@router.post("/{name}/find", response_model=FindOut, responses=_ERRORS)
def find(name: str, body: FindIn, session: SessionDep, settings: SettingsDep):
    """C-FIND on the node. PatientName/PatientID and other identifiers are withheld from results."""
    node = nodes.get_node(session, name)
    res = DicomClient(settings, node).find(body.level, body.query, root=body.root)
    key = settings.get_pseudonym_key()
    results = []
    for ds in res.results:
        item = result_to_dict(ds, withhold=PATIENT_IDENTIFIERS)
        pid = str(ds.get("PatientID", "") or "")
        if pid:  # the same pseudonym as the cohort manifests
            item["patient_key"] = patient_key(key, pid, str(ds.get("IssuerOfPatientID", "") or ""))
        results.append(item)
    return FindOut(results=results, count=len(results), capped=res.capped, withheld=sorted(PATIENT_IDENTIFIERS))


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


@router.post("/{name}/probe", response_model=ProbeOut, responses=_ERRORS)
def probe_node(name: str, session: SessionDep, settings: SettingsDep, actor: ActorDep):
    """Probe the node (C-ECHO, C-FIND levels/models and result cap, C-GET, storage syntaxes, a test
    C-MOVE of one instance to our AE) and keep the findings; the planner uses them."""
    node = nodes.get_node(session, name)
    out = probe_and_store(session, settings, node, actor)
    if not out["capabilities"].get("echo", {}).get("ok"):
        from app.errors import RetriableDicomError

        raise RetriableDicomError(f"probe of {name}: no answer to C-ECHO "
                                  f"({out['capabilities'].get('echo', {}).get('error')})")
    return out
