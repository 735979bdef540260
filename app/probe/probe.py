"""Probe a DIMSE node: C-ECHO, C-FIND levels and models, C-GET, C-MOVE, storage contexts, result cap.

Cheap by design: unfiltered C-FIND only at the top level (read until `max_results`, then the
association is aborted), deeper levels inside ONE sampled study and series, and C-GET/C-MOVE
of ONE sampled instance. The C-GET'd instance is refused by our handler with 0xA700 (we did not
keep it, so we do not say Success); a C-MOVE'd one lands in our Storage SCP like any other.
The result is a plain dict, stored in `PacsNode.options["capabilities"]`.
"""

from __future__ import annotations

import logging
import socket
import time
from datetime import datetime, timezone

from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import Verification

from app.config import Settings
from app.dicom.queries import UNIQUE_KEY, build_identifier
from app.dicom.scu import MODELS, MAX_CONTEXTS, PENDING, storage_contexts_for_get, status_text

log = logging.getLogger("radcohort.probe")

CANCEL = 0xFE00
NOT_KEPT = 0xA700
FIND_KEYS = {"PATIENT": ("PatientID",), "STUDY": ("StudyInstanceUID",),
             "SERIES": ("StudyInstanceUID", "SeriesInstanceUID"),
             "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
LEVELS = {"study": ("STUDY", "SERIES", "IMAGE"), "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE")}


class _Assoc:
    """One association with the given contexts; `.assoc` is None when it was not established."""

    def __init__(self, settings: Settings, node, contexts, *, handlers=None, roles=None):
        ae = AE(ae_title=settings.ae_title)
        t = settings.dicom_timeout
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
        ae.maximum_pdu_size = settings.max_pdu
        for cx in contexts:
            if isinstance(cx, str):
                ae.add_requested_context(cx)
            else:
                ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
        self.error = None
        try:
            self.assoc = ae.associate(node.host, int(node.port), ae_title=node.ae_title, max_pdu=settings.max_pdu,
                                      ext_neg=roles or None, evt_handlers=handlers or None)
        except OSError as exc:
            self.assoc, self.error = None, f"cannot reach: {exc}"
            return
        if not self.assoc.is_established:
            self.error = "association rejected" if self.assoc.is_rejected else "no association (refused/timeout)"
            self.assoc = None

    def accepted(self, sop: str) -> bool:
        return self.assoc is not None and any(cx.abstract_syntax == sop for cx in self.assoc.accepted_contexts)

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()


def _find(a: _Assoc, model, level: str, root: str, query: dict, keys: tuple, max_results: int) -> dict:
    """One C-FIND on an open association; stops reading (aborts) past max_results."""
    ident = build_identifier(level, query, root, return_keys=keys)
    out: dict = {"ok": False, "count": 0, "status": None, "capped": False}
    rows = []
    try:
        for status, ds in a.assoc.send_c_find(ident, model):
            if "Status" not in status:
                out["error"] = "no response"
                return out
            if status.Status in PENDING:
                if ds is not None:
                    rows.append(ds)
                if len(rows) >= max_results:
                    a.assoc.abort()
                    out.update(ok=True, count=len(rows), status="aborted", capped=False, at_least=True)
                    out["rows"] = rows
                    return out
                continue
            out["status"] = status_text(status.Status)
            out["ok"] = status.Status in (0x0000, CANCEL)
            out["capped"] = status.Status == CANCEL
    except (ValueError, RuntimeError) as exc:  # context not accepted / association gone
        out["error"] = str(exc)
    out["count"] = len(rows)
    out["rows"] = rows
    return out


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def probe_node(settings: Settings, node, *, max_results: int = 5000) -> dict:
    """Everything the planner wants to know about a DIMSE node (never raises for PACS answers)."""
    caps: dict = {"probed_at": datetime.now(timezone.utc).isoformat(), "echo": {}, "find": {},
                  "find_cap": None, "instance_cap": None, "get": {}, "move": {}, "storage": {}}
    t0 = time.perf_counter()
    a = _Assoc(settings, node, [Verification])
    if a.assoc is None:
        caps["echo"] = {"ok": False, "error": a.error}
        return caps
    st = a.assoc.send_c_echo()
    a.close()
    caps["echo"] = {"ok": "Status" in st and st.Status == 0, "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 2)}

    # ---- C-FIND: the top level unfiltered (reveals a cap), deeper levels within one sample
    sample: dict[str, str] = {}
    for root, levels in LEVELS.items():
        model = MODELS[(root, "find")]
        a = _Assoc(settings, node, [model])
        res_root: dict = {"model_accepted": a.accepted(model)}
        if a.assoc is None or not res_root["model_accepted"]:
            res_root["error"] = a.error or "information model not accepted"
            caps["find"][root] = res_root
            a.close()
            continue
        query: dict[str, str] = {}
        for level in levels:
            if a.assoc is None or not a.assoc.is_established:
                a = _Assoc(settings, node, [model])
                if a.assoc is None:
                    res_root[level] = {"ok": False, "error": a.error}
                    continue
            keys = FIND_KEYS[level]
            q = {k: v for k, v in query.items() if not (level == "IMAGE" and k == "SeriesInstanceUID")}
            r = _find(a, model, level, root, q, keys, max_results)
            rows = r.pop("rows", [])
            res_root[level] = r
            if root == "study" and level == "STUDY" and r["ok"]:
                if r["capped"]:
                    caps["find_cap"] = r["count"]
            if root == "study" and level == "SERIES" and r["capped"]:
                caps["find_cap"] = caps["find_cap"] or r["count"]
            if root == "study" and level == "IMAGE" and r["capped"]:
                caps["instance_cap"] = r["count"]
            # narrow to one sample for the next level down (hierarchical queries stay cheap)
            if rows and level in ("STUDY", "SERIES"):
                key = UNIQUE_KEY[level]
                v = str(rows[0].get(key, "") or "")
                if v:
                    query[key] = v
                    if root == "study":
                        sample[key] = v
            if rows and level == "IMAGE" and root == "study":
                sample["SOPInstanceUID"] = str(rows[0].get("SOPInstanceUID", "") or "")
                sample["SOPClassUID"] = str(rows[0].get("SOPClassUID", "") or "")
                # IMAGE level was asked within the whole sample study: take the instance's own series
                sample["SeriesInstanceUID"] = str(rows[0].get("SeriesInstanceUID", "") or "")
            if level == "PATIENT" and rows:
                v = str(rows[0].get("PatientID", "") or "")
                if v:
                    query["PatientID"] = v
        a.close()
        caps["find"][root] = res_root
    caps["levels"] = sorted({f"{root}:{lvl}" for root, r in caps["find"].items()
                             for lvl, v in r.items() if isinstance(v, dict) and v.get("ok")})

    have_sample = all(sample.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    keys = {k: sample[k] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")} if have_sample else {}

    # ---- C-GET: accepted storage contexts = what the PACS will send us; one instance as a test
    get_model = MODELS[("study", "get")]
    storage = storage_contexts_for_get(MAX_CONTEXTS - 1, [sample["SOPClassUID"]] if sample.get("SOPClassUID") else None)
    roles = [build_role(sop, scp_role=True) for sop in dict.fromkeys(cx.abstract_syntax for cx in storage)]
    arrived: list[dict] = []

    def refuse(event) -> int:
        arrived.append({"sop_class": str(event.request.AffectedSOPClassUID),
                        "transfer_syntax": str(event.context.transfer_syntax)})
        return NOT_KEPT  # a probe keeps nothing, so it never answers Success

    a = _Assoc(settings, node, [get_model, *storage], handlers=[(evt.EVT_C_STORE, refuse)], roles=roles)
    get: dict = {"model_accepted": a.accepted(get_model), "works": False}
    if a.assoc is not None:
        acc: dict[str, set[str]] = {}
        for cx in a.assoc.accepted_contexts:
            if cx.abstract_syntax != get_model:
                acc.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
        caps["storage"] = {k: sorted(v) for k, v in acc.items()}
        if get["model_accepted"] and have_sample:
            ident = build_identifier("IMAGE", keys, "study", return_keys=())
            final = None
            try:
                for status, _ds in a.assoc.send_c_get(ident, get_model):
                    if "Status" in status and status.Status not in PENDING:
                        final = status.Status
            except (ValueError, RuntimeError) as exc:
                get["error"] = str(exc)
            get["status"] = status_text(final) if final is not None else None
            get["works"] = bool(arrived)
            if arrived:
                get["sent_as"] = arrived[0]
        a.close()
    else:
        get["error"] = a.error
    caps["get"] = get

    # ---- C-MOVE of the sample instance to our AE (needs our AE registered on the PACS)
    move_model = MODELS[("study", "move")]
    a = _Assoc(settings, node, [move_model])
    move: dict = {"model_accepted": a.accepted(move_model)}
    if a.assoc is not None and move["model_accepted"] and have_sample:
        ident = build_identifier("IMAGE", keys, "study", return_keys=())
        final, last = None, None
        try:
            for status, _ds in a.assoc.send_c_move(ident, settings.ae_title, move_model):
                if "Status" in status:
                    last = status
                    if status.Status not in PENDING:
                        final = status.Status
                        move["comment"] = str(status.get("ErrorComment", "") or "")[:200]
        except (ValueError, RuntimeError) as exc:
            move["error"] = str(exc)
        move["status"] = status_text(final) if final is not None else None
        move["destination_known"] = final != 0xA801
        if last is not None:
            move["completed"] = int(last.get("NumberOfCompletedSuboperations", 0) or 0)
            move["failed"] = int(last.get("NumberOfFailedSuboperations", 0) or 0)
        move["works"] = final is not None and final == 0 and move.get("completed", 0) > 0
        # a failed move says something only if our SCP was there to receive (Orthanc 1.10 answers
        # an unknown destination with 0xC000, not 0xA801)
        move["receiver_listening"] = _listening(settings.scp_host, settings.scp_port)
    elif a.assoc is None:
        move["error"] = a.error
    if a.assoc is not None:
        a.close()
    caps["move"] = move
    caps["sampled"] = have_sample
    caps["elapsed_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    return caps


def preferred_method(options: dict | None, configured: str) -> tuple[str, str | None]:
    """The retrieve method the planner should use, and why it differs from `configured` (or None)."""
    options = options or {}
    if (options.get("protocol") or "dimse") in ("dicomweb", "both") and options.get("dicomweb_url"):
        return "dicomweb", None if configured == "dicomweb" else "node protocol is DICOMweb"
    caps = options.get("capabilities") or {}
    move, get = caps.get("move") or {}, caps.get("get") or {}
    move_broken = (move.get("model_accepted") is False or move.get("destination_known") is False
                   or (move.get("receiver_listening") and move.get("works") is False))
    if configured == "move" and get.get("works") and move_broken:
        return "get", "the probe found C-MOVE impossible (model refused or our AE unknown) and C-GET working"
    return configured, None


def effective_find_cap(options: dict | None) -> int | None:
    """A cap on C-FIND results: the policy's, the node's `find_limit`, else the probe's finding."""
    options = options or {}
    pol = (options.get("policy") or {}).get("max_find_results")
    caps = options.get("capabilities") or {}
    return pol or options.get("find_limit") or caps.get("instance_cap") or caps.get("find_cap")


def find_caps_by_level(options: dict | None) -> dict[str, int | None]:
    """The cap to assume per C-FIND level: IMAGE answers may be capped differently (Orthanc:
    LimitFindInstances vs LimitFindResults); a configured limit applies to every level."""
    options = options or {}
    configured = (options.get("policy") or {}).get("max_find_results") or options.get("find_limit")
    caps = options.get("capabilities") or {}
    return {"IMAGE": configured or caps.get("instance_cap") or caps.get("find_cap"),
            "OTHER": configured or caps.get("find_cap")}
