"""Probe a DIMSE node: what it answers, which matching keys it honours, and where it can send.

Cheap by design: unfiltered C-FIND only at the top level (read until `max_results`, then the
association is aborted), deeper levels inside ONE sampled study and series. Key honouring asks,
within the sample, for a value that must match nothing (StudyDate 18000101, Modality ZZ, ...): a PACS
that still answers ignores the key. The probe stores and indexes nothing: the move destination is
learnt from a C-MOVE whose identifier matches nothing (0xA801 = we are unknown; Success with zero
sub-operations = known), and the one C-GET'd instance (the syntaxes the PACS really sends) is refused
by our handler with 0xA700 and dropped. The result is a plain dict, stored in
`PacsNode.options["capabilities"]`; `summary` is its one-line verdict.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time
from datetime import datetime, timezone

from pydicom.uid import generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import Verification

from app.config import Settings
from app.dicom.queries import UNIQUE_KEY, build_identifier
from app.dicom.scu import MODELS, MAX_CONTEXTS, PENDING, Node, storage_contexts_for_get, status_text
from app.errors import DicomError

log = logging.getLogger("radcohort.probe")

CANCEL = 0xFE00
NOT_KEPT = 0xA700
MOVE_DESTINATION_UNKNOWN = 0xA801
FIND_KEYS = {"PATIENT": ("PatientID",), "STUDY": ("StudyInstanceUID", "PatientID", "RetrieveAETitle"),
             "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "RetrieveAETitle"),
             "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")}
LEVELS = {"study": ("STUDY", "SERIES", "IMAGE"), "patient": ("PATIENT", "STUDY", "SERIES", "IMAGE")}
# The matching keys radcohort plans with (pull to quota: SERIES level with study and patient keys
# above it), each with a value no real study carries.
NO_MATCH = {
    "STUDY": {"StudyDate": "18000101", "ModalitiesInStudy": "ZZ", "PatientSex": "Z",
              "PatientBirthDate": "18000101-18000102", "StudyDescription": "RADCOHORT PROBE NO MATCH"},
    "SERIES": {"Modality": "ZZ", "BodyPartExamined": "NOSUCHPART", "StudyDate": "18000101", "PatientSex": "Z",
               "PatientBirthDate": "18000101-18000102"},
}
CALLED_AE_UNKNOWN = "Called AE title not recognised"
CALLING_AE_UNKNOWN = "Calling AE title not recognised"


class _Assoc:
    """One association with the given contexts; `.assoc` is None when it was not established
    (`.error` says why, with the peer's rejection reason)."""

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
        self.error = self.reject_reason = None
        try:
            self.assoc = ae.associate(node.host, int(node.port), ae_title=node.ae_title, max_pdu=settings.max_pdu,
                                      ext_neg=roles or None, evt_handlers=handlers or None,
                                      tls_args=Node.of(node).tls_args())
        except (OSError, DicomError) as exc:
            self.assoc, self.error = None, f"cannot reach: {getattr(exc, 'message', exc)}"
            return
        if not self.assoc.is_established:
            if self.assoc.is_rejected:
                rsp = self.assoc.acceptor.primitive
                self.reject_reason = str(getattr(rsp, "reason_str", "") or "")
                self.error = f"association rejected ({self.reject_reason or 'no reason given'})"
            else:
                self.error = "no association (refused/timeout)"
            self.assoc = None

    def accepted(self, sop: str) -> bool:
        return self.assoc is not None and any(cx.abstract_syntax == sop for cx in self.assoc.accepted_contexts)

    @property
    def open(self) -> bool:
        return self.assoc is not None and self.assoc.is_established

    def close(self) -> None:
        if self.open:
            self.assoc.release()


def _find(a: _Assoc, model, level: str, root: str, query: dict, keys: tuple, max_results: int) -> dict:
    """One C-FIND on an open association; stops reading (aborts) past max_results answers.

    `answers` counts what the PACS sent, `count` the distinct unique keys among them and `duplicates`
    the difference (a PACS answering once per instance at STUDY level)."""
    ident = build_identifier(level, query, root, return_keys=keys)
    out: dict = {"ok": False, "count": 0, "answers": 0, "duplicates": 0, "status": None, "capped": False}
    rows: list = []
    key = UNIQUE_KEY[level]

    def tally() -> None:
        uids = [str(ds.get(key, "") or "") for ds in rows]
        distinct = len(set(uids))
        out.update(answers=len(rows), count=distinct, duplicates=len(rows) - distinct)
        out["rows"] = list({u: ds for u, ds in zip(uids, rows)}.values())  # first answer per unique key

    try:
        for status, ds in a.assoc.send_c_find(ident, model):
            if "Status" not in status:
                out["error"] = "no response"
                tally()
                return out
            if status.Status in PENDING:
                if ds is not None:
                    rows.append(ds)
                if len(rows) >= max_results:
                    a.assoc.abort()
                    out.update(ok=True, status="aborted", capped=False, at_least=True)
                    tally()
                    return out
                continue
            out["status"] = status_text(status.Status)
            out["ok"] = status.Status in (0x0000, CANCEL)
            out["capped"] = status.Status == CANCEL
    except (ValueError, RuntimeError) as exc:  # context not accepted / association gone
        out["error"] = str(exc)
    tally()
    return out


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _reject_note(settings: Settings, node, reason: str | None) -> str | None:
    if reason == CALLED_AE_UNKNOWN:
        return (f"the PACS rejected the association: called AE title '{node.ae_title}' not recognised "
                f"(check the node's AE title)")
    if reason == CALLING_AE_UNKNOWN:
        return f"the PACS rejected the association: our AE title '{settings.ae_title}' is not registered there"
    return None


class _Finder:
    """C-FINDs on one study-root association, reopened after an abort or a refusal."""

    def __init__(self, settings: Settings, node, model):
        self.settings, self.node, self.model = settings, node, model
        self.a: _Assoc | None = None

    def find(self, level: str, query: dict, keys: tuple, max_results: int) -> dict:
        if self.a is None or not self.a.open:
            self.a = _Assoc(self.settings, self.node, [self.model])
            if self.a.assoc is None:
                return {"ok": False, "error": self.a.error, "count": 0, "answers": 0, "rows": []}
        return _find(self.a, self.model, level, "study", query, keys, max_results)

    def close(self) -> None:
        if self.a is not None:
            self.a.close()


def _keys_not_honoured(settings: Settings, node, sample: dict) -> tuple[dict, dict]:
    """Per level, the planned matching keys the PACS ignores (it answers a value that must match
    nothing) and those it refuses (an error status), each asked within the sample study."""
    ignored: dict[str, list[str]] = {}
    refused: dict[str, list[str]] = {}
    f = _Finder(settings, node, MODELS[("study", "find")])
    try:
        for level, probes in NO_MATCH.items():
            if level == "STUDY":  # scoped by the level above, so a PACS that ignores the key answers one patient
                scope = ({"PatientID": sample["PatientID"]} if sample.get("PatientID")
                         else {"StudyInstanceUID": sample["StudyInstanceUID"]})
            else:
                scope = {"StudyInstanceUID": sample["StudyInstanceUID"]}
            for key, value in probes.items():
                r = f.find(level, {**scope, key: value}, (UNIQUE_KEY[level],), max_results=1)
                if not r["ok"] and r.get("status"):  # the PACS answered with an error status
                    refused.setdefault(level, []).append(key)
                elif r["ok"] and r["answers"]:
                    ignored.setdefault(level, []).append(key)
    finally:
        f.close()
    return ignored, refused


def _find_uid_lists(settings: Settings, node, study_uid: str) -> bool | None:
    """Does a STUDY C-FIND with a two-UID list (the sample and a fresh UID) answer the sample?"""
    f = _Finder(settings, node, MODELS[("study", "find")])
    try:
        r = f.find("STUDY", {"StudyInstanceUID": f"{study_uid}\\{generate_uid()}"}, ("StudyInstanceUID",), 10)
    finally:
        f.close()
    if r.get("error") and not r.get("status"):
        return None  # no association: not learnt
    return bool(r["ok"] and any(str(ds.get("StudyInstanceUID", "")) == study_uid for ds in r.get("rows", [])))


def _move_nothing(a: _Assoc, model, destination: str, uids: list[str]) -> dict:
    """A STUDY C-MOVE whose StudyInstanceUID(s) match nothing: its final status and sub-operations."""
    ident = build_identifier("STUDY", {"StudyInstanceUID": "\\".join(uids)}, "study", return_keys=())
    out: dict = {"status_code": None, "suboperations": 0}
    last = None
    try:
        for status, _ds in a.assoc.send_c_move(ident, destination, model):
            if "Status" in status:
                last = status
                if status.Status not in PENDING:
                    out["status_code"] = int(status.Status)
                    comment = str(status.get("ErrorComment", "") or "")[:200]
                    if comment:
                        out["comment"] = comment
    except (ValueError, RuntimeError) as exc:
        out["error"] = str(exc)
    if last is not None:
        out["suboperations"] = sum(int(last.get(k, 0) or 0) for k in (
            "NumberOfCompletedSuboperations", "NumberOfFailedSuboperations", "NumberOfWarningSuboperations"))
    return out


def _probe_move(settings: Settings, node) -> dict:
    """Are we a known move destination, and does C-MOVE take a UID list? Moves no image."""
    move_model = MODELS[("study", "move")]
    # with the FIND model too: a strict PACS (dcmqrscp --require-find) refuses MOVE-only associations
    a = _Assoc(settings, node, [move_model, MODELS[("study", "find")]])
    move: dict = {"model_accepted": a.accepted(move_model), "destination_known": None, "works": None,
                  "uid_lists": None}
    if a.assoc is None:
        move["error"] = a.error
        move["reject_reason"] = a.reject_reason
        return move
    if not move["model_accepted"]:
        a.close()
        move["works"] = False
        return move
    try:
        one = _move_nothing(a, move_model, settings.ae_title, [generate_uid()])
        code = one["status_code"]
        move["status"] = status_text(code) if code is not None else None
        if one.get("comment"):
            move["comment"] = one["comment"]
        if code == MOVE_DESTINATION_UNKNOWN:
            move.update(destination_known=False, works=False)
        elif code in (0x0000, 0xB000):
            if one["suboperations"]:  # it moved something for a UID that matches nothing
                move["ignores_identifier"] = True
            # the control: the same to an AE title nobody has. dcmqrscp answers Success to both (it
            # looks for matches before the destination), so only a refused control proves we are known
            if not a.open:
                a.close()
                a = _Assoc(settings, node, [move_model, MODELS[("study", "find")]])
            control = _move_nothing(a, move_model, f"NOSUCHAE{secrets.token_hex(4).upper()}", [generate_uid()]) \
                if a.open else {"status_code": None}
            move["control_status"] = status_text(control["status_code"]) if control["status_code"] is not None else None
            if control["status_code"] == MOVE_DESTINATION_UNKNOWN:
                move.update(destination_known=True, works=True)
            else:
                move["note"] = ("the PACS answers a C-MOVE that matches nothing without checking its destination "
                                "(Success to an unknown AE too): whether it knows our AE cannot be learnt "
                                "without moving an image")
        else:
            # e.g. Orthanc 1.10 answers 0xC000 to a move that matches nothing, known destination or not
            move["note"] = (f"a C-MOVE matching nothing was answered {move['status'] or 'with no status'}: "
                            "whether the PACS knows our AE cannot be learnt without moving an image")
        if code in (0x0000, 0xB000):
            # a UID list that matches nothing: an error means the PACS cannot take lists (pynetdicom's
            # qrscp: 0xA801); Success only means it did not refuse one
            if not a.open:
                a.close()
                a = _Assoc(settings, node, [move_model, MODELS[("study", "find")]])
            if a.open:
                two = _move_nothing(a, move_model, settings.ae_title, [generate_uid(), generate_uid()])
                move["uid_lists"] = two["status_code"] in (0x0000, 0xB000)
                if not move["uid_lists"]:
                    move["uid_list_status"] = (status_text(two["status_code"]) if two["status_code"] is not None
                                               else two.get("error"))
    finally:
        a.close()
    # what a refused move would mean depends on our receiver being there (informational)
    move["receiver_listening"] = _listening(settings.scp_host, settings.scp_port)
    return move


def probe_node(settings: Settings, node, *, max_results: int = 5000) -> dict:
    """Everything the planner wants to know about a DIMSE node (never raises for PACS answers)."""
    caps: dict = {"probed_at": datetime.now(timezone.utc).isoformat(), "echo": {}, "find": {},
                  "find_cap": None, "instance_cap": None, "get": {}, "move": {}, "storage": {}, "notes": []}
    t0 = time.perf_counter()
    a = _Assoc(settings, node, [Verification])
    if a.assoc is None:
        caps["echo"] = {"ok": False, "error": a.error}
        note = _reject_note(settings, node, a.reject_reason)
        if note:
            caps["notes"].append(note)
        caps["summary"] = summarize(caps)
        return caps
    st = a.assoc.send_c_echo()
    a.close()
    caps["echo"] = {"ok": "Status" in st and st.Status == 0, "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 2)}

    # ---- C-FIND: the top level unfiltered (reveals a cap), deeper levels within one sample
    sample: dict[str, str] = {}
    duplicates: dict[str, int] = {}
    image_needs_series = None
    for root, levels in LEVELS.items():
        model = MODELS[(root, "find")]
        a = _Assoc(settings, node, [model])
        res_root: dict = {"model_accepted": a.accepted(model)}
        if a.assoc is None or not res_root["model_accepted"]:
            res_root["error"] = a.error or "information model not accepted"
            note = _reject_note(settings, node, a.reject_reason)
            if note and note not in caps["notes"]:
                caps["notes"].append(note)
            caps["find"][root] = res_root
            a.close()
            continue
        query: dict[str, str] = {}
        for level in levels:
            if not a.open:
                a = _Assoc(settings, node, [model])
                if a.assoc is None:
                    res_root[level] = {"ok": False, "error": a.error}
                    continue
            keys = FIND_KEYS[level]
            if level == "IMAGE":
                # hierarchical PACS (dcmqrscp -XF) need the series too: try the study alone first
                q = {k: v for k, v in query.items() if k != "SeriesInstanceUID"}
                r = _find(a, model, level, root, q, keys, max_results)
                if (not r["ok"] or not r["count"]) and query.get("SeriesInstanceUID"):
                    if not a.open:
                        a = _Assoc(settings, node, [model])
                    if a.open:
                        r2 = _find(a, model, level, root, query, keys, max_results)
                        if r2["ok"] and r2["count"]:
                            r, r2["needs_series"] = r2, True
                            if root == "study":
                                image_needs_series = True
                elif r["ok"] and r["count"] and root == "study":
                    image_needs_series = False
            else:
                r = _find(a, model, level, root, query, keys, max_results)
            rows = r.pop("rows", [])
            res_root[level] = r
            if r.get("duplicates"):
                duplicates[f"{root}:{level}"] = r["duplicates"]
            if root == "study" and level in ("STUDY", "SERIES") and r["capped"]:
                caps["find_cap"] = caps["find_cap"] or r["answers"]
            if root == "study" and level == "IMAGE" and r["capped"]:
                caps["instance_cap"] = r["answers"]
            aet = str(rows[0].get("RetrieveAETitle", "") or "").strip() if rows else ""
            if aet and not caps.get("retrieve_ae_title"):
                caps["retrieve_ae_title"] = aet.split("\\")[0]
            if root == "study" and level == "STUDY" and rows:
                pid = str(rows[0].get("PatientID", "") or "")
                if pid:
                    sample["PatientID"] = pid  # a query value only: never stored in the capabilities
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
                # IMAGE level may have been asked within the whole sample study: take the instance's series
                sample["SeriesInstanceUID"] = str(rows[0].get("SeriesInstanceUID", "") or "")
            if level == "PATIENT" and rows:
                v = str(rows[0].get("PatientID", "") or "")
                if v:
                    query["PatientID"] = v
        a.close()
        caps["find"][root] = res_root
    caps["levels"] = sorted({f"{root}:{lvl}" for root, r in caps["find"].items()
                             for lvl, v in r.items() if isinstance(v, dict) and v.get("ok")})
    caps["image_level_needs_series"] = image_needs_series
    caps["duplicate_answers"] = bool(duplicates)
    if duplicates:
        caps["duplicates"] = duplicates
    aet = caps.get("retrieve_ae_title")
    if aet and aet != node.ae_title:
        caps["called_ae_mismatch"] = True
        # a hint, not a verdict: some archives name a separate retrieve AE on purpose
        caps["notes"].append(f"the PACS names itself '{aet}' in its answers (RetrieveAETitle) but the node is "
                             f"configured as '{node.ae_title}': check the node's AE title (a PACS that checks "
                             f"the called AE would refuse us)")

    # ---- which planned matching keys the PACS honours, and UID lists in C-FIND (within the sample)
    uid_lists: dict = {"find": None, "move": None}
    if sample.get("StudyInstanceUID") and "study:STUDY" in caps["levels"]:
        ignored, refused = _keys_not_honoured(settings, node, sample)
        caps["keys_not_honoured"] = ignored
        if refused:
            caps["keys_refused"] = refused
        uid_lists["find"] = _find_uid_lists(settings, node, sample["StudyInstanceUID"])
    else:
        caps["keys_not_honoured"] = None  # nothing to test against: not learnt

    have_sample = all(sample.get(k) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
    keys = {k: sample[k] for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")} if have_sample else {}

    # ---- C-GET: accepted storage contexts = what the PACS will send us; one instance as a test,
    # refused by our handler (0xA700) and dropped: nothing is written
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

    # ---- C-MOVE matching nothing: are we a known destination, does it take UID lists
    caps["move"] = _probe_move(settings, node)
    uid_lists["move"] = caps["move"].get("uid_lists")
    caps["uid_lists"] = uid_lists
    refused_lists = sorted(op for op, v in uid_lists.items() if v is False)
    # True/False when learnt; None leaves what a retrieval learnt earlier (app.probe.service)
    caps["uid_lists_refused"] = (bool(refused_lists) if refused_lists or any(v for v in uid_lists.values())
                                 else None)
    if refused_lists:
        caps["uid_lists_refused_in"] = refused_lists
    caps["sampled"] = have_sample
    caps["elapsed_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    caps["summary"] = summarize(caps)
    return caps


def summarize(caps: dict) -> str:
    """One line: 'echo ok, query ok (STUDY/SERIES/IMAGE), move ok, get refused, result cap 500, ...'."""
    echo = caps.get("echo") or {}
    if not echo.get("ok"):
        return "; ".join([f"echo failed ({echo.get('error') or 'no answer'})", *caps.get("notes", [])])
    parts = ["echo ok"]
    study = [lvl for lvl in ("STUDY", "SERIES", "IMAGE") if f"study:{lvl}" in caps.get("levels", [])]
    parts.append(f"query ok ({'/'.join(study)})" if study else "query refused")
    if caps.get("image_level_needs_series"):
        parts.append("IMAGE level needs SeriesInstanceUID")
    move = caps.get("move") or {}
    if move.get("model_accepted") is False:
        parts.append("move refused" + (f" ({move['error']})" if move.get("error") else ""))
    elif move.get("destination_known") is True:
        parts.append("move ok")
    elif move.get("destination_known") is False:
        parts.append("move: our AE is not a known destination (0xA801)")
    else:
        parts.append("move not learnt")
    get = caps.get("get") or {}
    parts.append("get ok" if get.get("works") else "get refused")
    if caps.get("find_cap"):
        parts.append(f"result cap {caps['find_cap']}")
    if caps.get("instance_cap") and caps.get("instance_cap") != caps.get("find_cap"):
        parts.append(f"instance cap {caps['instance_cap']}")
    kn = caps.get("keys_not_honoured")
    if kn:
        parts.append("keys not honoured: " + ", ".join(f"{lvl} {k}" for lvl, ks in kn.items() for k in ks))
    elif kn is None:
        parts.append("key matching not tested (no study to test against)")
    if caps.get("keys_refused"):
        parts.append("keys refused: " + ", ".join(f"{lvl} {k}" for lvl, ks in caps["keys_refused"].items()
                                                 for k in ks))
    if caps.get("duplicate_answers"):
        parts.append("duplicate answers")
    if caps.get("uid_lists_refused_in"):
        parts.append("UID lists refused (" + "/".join(caps["uid_lists_refused_in"]) + ")")
    return ", ".join(parts) + "".join(f"; {n}" for n in caps.get("notes", []))


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
