"""PACS nodes: register, list, delete, C-ECHO and C-FIND (thin: parse -> service -> schema).

Find results never carry patient identifiers (PatientName, PatientID, ...): they are withheld and
replaced by `patient_key`, the same HMAC pseudonym the cohort exports use.
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import ActorDep, SessionDep, SettingsDep
from app.cohorts.service import patient_key
from app.dicom.queries import PATIENT_IDENTIFIERS, result_to_dict
from app.dicom.scu import DicomClient
from app.retrievals import nodes
from app.retrievals.schemas import EchoOut, FindIn, FindOut, NodeIn, NodeOut

router = APIRouter(prefix="/pacs-nodes", tags=["pacs"])

_ERRORS = {404: {"description": "unknown node"}, 502: {"description": "the PACS refused or failed"},
           504: {"description": "the PACS is unreachable or timed out"}}


@router.post("", status_code=201, response_model=NodeOut, responses={409: {"description": "duplicate name"}})
def create_node(body: NodeIn, session: SessionDep, actor: ActorDep):
    """Register a PACS node (its AE title is then also accepted by our Storage SCP)."""
    return NodeOut.of(nodes.create_node(session, body, actor))


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
