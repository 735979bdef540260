"""Run one retrieval: expected list -> skip what is indexed -> C-MOVE/C-GET/WADO-RS -> arrivals -> exact report.

Arrival is judged by the Instance table only (the truth of "in store and index"), never by the
PACS's final status: sub-operation counts are recorded, and compared, but an instance counts as
received only when its index row exists. Each state change is its own commit, so a reader (the
API, a progress bar) sees the job move.

The runner is composed, not subclassed: planning is pure (app.retrievals.plan); the PACS etiquette
is a *gate* it is handed (`Gate`: app.policy.governor.Governor by default - windows, limits,
adaptive backoff, association slots, pause/cancel), asked before starting, at every wait and around
every retrieve; the *client* (app.retrievals.client) is picked by the method, which the node's
protocol and its probe choose (DICOMweb, or C-GET where C-MOVE cannot reach us) unless the caller
forces one; C-GET and WADO-RS arrivals go through the one index sink (app.index.sink).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, ContextManager, Protocol

from sqlalchemy import delete, func, insert, select, update

from app.context import AppContext
from app.db.models import AuditEvent, Instance, PacsNode, Retrieval, RetrievalItem, StoreConflict
from app.dicom.queries import validate_query
from app.dicom.scu import MOVE_DESTINATION_UNKNOWN, DicomClient, RetrieveResult
from app.errors import DicomError, PermanentDicomError, RetriableDicomError
from app.policy.governor import Cancelled, Governor
from app.probe.probe import preferred_method
from app.retrievals.client import Both, GovernedClient, make_client
from app.retrievals.expected import ExpectedInstance, list_expected
from app.retrievals.lease import Lease
from app.retrievals.plan import MAX_UIDS_PER_RETRIEVE, Unit, _split, pieces, plan_units, query_depth

log = logging.getLogger("radcohort.retrievals")

_CHUNK = 500
POLL_S = 0.2


@dataclass
class Progress:
    """What a progress bar needs; passed to `on_progress` after every change."""

    retrieval_id: int
    phase: str = "listing"
    expected: int = 0
    skipped: int = 0
    received: int = 0
    to_fetch: int = 0
    units_done: int = 0
    units: int = 0


@dataclass
class _Attempt:
    """What one lane brought back: the unit, the PACS's final answer or the error it raised, and
    whether any of the unit's instances arrived meanwhile."""

    unit: Unit
    result: RetrieveResult | None
    error: Exception | None
    progressed: bool


@dataclass
class _State:
    expected: dict[str, ExpectedInstance] = field(default_factory=dict)
    present_at_start: set[str] = field(default_factory=set)
    arrived: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)  # sop -> reason
    errors: list[str] = field(default_factory=list)
    subops: dict[str, int] = field(default_factory=lambda: {"completed": 0, "failed": 0, "warning": 0})
    statuses: list[str] = field(default_factory=list)
    retried_by_get: int = 0
    verify: set[str] = field(default_factory=set)  # indexed, but from another sender: fetched again


def provenance(session, uids) -> dict[str, tuple[str | None, datetime]]:
    """sop -> (source node, received at) of these SOP Instance UIDs that are in the index."""
    uids = list(uids)
    out: dict[str, tuple[str | None, datetime]] = {}
    for i in range(0, len(uids), _CHUNK):
        rows = session.execute(select(Instance.sop_instance_uid, Instance.source_node, Instance.received_at)
                               .where(Instance.sop_instance_uid.in_(uids[i:i + _CHUNK])))
        out.update({sop: (src, at) for sop, src, at in rows})
    return out


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)  # SQLite hands back naive UTC


def present(session, uids) -> set[str]:
    """Which of these SOP Instance UIDs are in the index."""
    uids = list(uids)
    found: set[str] = set()
    for i in range(0, len(uids), _CHUNK):
        found.update(session.scalars(select(Instance.sop_instance_uid)
                                     .where(Instance.sop_instance_uid.in_(uids[i:i + _CHUNK]))))
    return found


MAX_REFUSALS = 3  # consecutive refused retrieves with nothing arriving: the PACS refuses us, stop
SUBOP_FAILED = "sub-operation failed"


def capabilities(node: PacsNode) -> dict:
    """What the probe and earlier jobs learnt about the node."""
    return dict(((node.options or {}) if isinstance(node.options, dict) else {}).get("capabilities") or {})


class Gate(Protocol):
    """What the runner asks of the PACS etiquette (app.policy.governor.Governor is one)."""

    limits: Any  # .max_associations: concurrent retrieves of the node, shared with its other jobs
    limits_bytes: Any  # a byte budget (None: none), charged after each retrieve
    schedule: Any  # .windows: transfer windows (retrieves stop at study/series boundaries)

    @property
    def unit_max(self) -> int | None:
        """Instances per retrieve (a rate limit's bucket; None: no limit)."""

    def claim_start(self) -> bool:
        """Wait for the window (or the user's resume); False: the job is not ours to run.
        Raises Cancelled."""

    def check_control(self) -> None:
        """At every wait: raises Cancelled when the user cancelled (waits out a pause)."""

    def association(self) -> ContextManager[None]:
        """Hold one of the node's association slots."""

    def before_unit(self, n_instances: int) -> None: ...

    def after_unit(self, ok: bool, nbytes: int = 0) -> None: ...

    def retry_sleep(self, seconds: float) -> None: ...

    def report(self) -> dict: ...

    def cancelled_now(self) -> bool: ...


GateFactory = Callable[[PacsNode, int], Gate]  # (node, retrieval id) -> the gate of this run


def governor_gate(ctx: AppContext, *, clock=None, poll_s: float = 2.0) -> GateFactory:
    """The node's policy as the gate (the default): windows, limits, backoff, pause/cancel."""
    return lambda node, retrieval_id: Governor(ctx, node, retrieval_id, clock=clock, poll_s=poll_s)


class RetrievalRunner:
    """Runs one retrieval in the calling thread, with its own sessions, through the gate it is handed.

    `gate(node, retrieval_id)`: the PACS etiquette of this run (default: the node's policy,
    `governor_gate`). `client_factory(node)`: the DIMSE client (a test's fake PACS; default
    DicomClient). `method`: the caller's override of the node's method ("move", "get", "dicomweb")."""

    def __init__(self, ctx: AppContext, retrieval_id: int, *,
                 on_progress: Callable[[Progress], None] | None = None,
                 client_factory: Callable[[PacsNode], DicomClient] | None = None, method: str | None = None,
                 gate: GateFactory | None = None):
        self.ctx = ctx
        self.method = method  # the caller's override; else chosen in run() from the node and its probe
        self._forced_method = method
        self.method_reason: str | None = None
        self.id = retrieval_id
        self.on_progress = on_progress
        self.client_factory = client_factory
        self.gate_factory = gate or governor_gate(ctx)
        self.gate: Gate | None = None
        self.cancelled: str | None = None
        self._finds: GovernedClient | None = None
        self._study_refused = False
        self._dw_store = None
        self.progress = Progress(retrieval_id)
        self._sink = None  # the index sink of C-GET / WADO-RS arrivals (app.index.sink), made on first use
        self._store_handler = None
        self._handler_lock = threading.Lock()
        self._listing_s: float | None = None
        self._expected: dict[str, ExpectedInstance] = {}

    # --------------------------------------------------------------- persistence helpers
    def _update(self, **values) -> None:
        """One commit; the gate's figures join the report; `status=running` never undoes a pause or a
        cancel that came meanwhile."""
        if "report" in values and self.gate is not None:
            values["report"] = {**(values["report"] or {}), **self.gate.report()}
        with self.ctx.sessions() as s:
            if values.get("status") != "running":
                s.execute(update(Retrieval).where(Retrieval.id == self.id).values(**values))
            else:
                rest = {k: v for k, v in values.items() if k != "status"}
                s.execute(update(Retrieval).where(Retrieval.id == self.id).values(**rest))
                s.execute(update(Retrieval).where(Retrieval.id == self.id,
                                                  Retrieval.status.in_(("queued", "running")))
                          .values(status="running"))
            s.commit()

    def _notify(self, **kw) -> None:
        for k, v in kw.items():
            setattr(self.progress, k, v)
        if self.on_progress:
            try:
                self.on_progress(self.progress)
            except Exception:  # noqa: BLE001 - a progress display must never break the job
                log.exception("progress callback failed")

    # --------------------------------------------------------------- the job
    def run(self) -> Retrieval:
        with self.ctx.sessions() as s:
            r = s.get(Retrieval, self.id)
            if r is None:
                raise LookupError(f"retrieval {self.id} does not exist")
            node = s.scalar(select(PacsNode).where(PacsNode.name == r.node_name))
            query = dict(r.query or {})
            if node is not None:
                s.expunge(node)
        st = _State()
        t0 = time.monotonic()
        if node is None:
            return self._finish(st, t0, error=f"PACS node '{r.node_name}' no longer exists", method=None)
        self.gate = self.gate_factory(node, self.id)
        self._study_refused = bool(capabilities(node).get("study_retrieve_refused"))
        if self._forced_method:
            self.method, self.method_reason = self._forced_method, "requested for this run"
        else:
            self.method, self.method_reason = preferred_method(node.options, node.retrieve_method or "move")
        try:
            claimed = self.gate.claim_start()
        except Cancelled as exc:
            return self._cancel_unstarted(str(exc) or "cancelled by the user before it started")
        if not claimed:
            return load_retrieval(self.ctx, self.id)
        method = self.method
        self._update(status="running", method=method, started_at=datetime.now(timezone.utc), finished_at=None,
                     error=None)
        client, self._finds = make_client(self.ctx.settings, node, method, self.gate, self.client_factory)
        try:
            query = validate_query(query)
            t_list = time.monotonic()
            caps = capabilities(node)
            listing = list_expected(client, query, lanes=self._lanes(node),
                                    image_by_study=caps.get("image_level_needs_series") is False,
                                    uid_list_finds=not caps.get("find_uid_lists_unanswered"))
            self._listing_s = round(time.monotonic() - t_list, 3)
        except DicomError as exc:
            return self._finish(st, t0, error=f"C-FIND failed: {exc.message}", method=method)
        except Exception as exc:  # noqa: BLE001 - the job must end in a state, whatever happened
            log.exception("retrieval %s: listing failed", self.id)
            return self._finish(st, t0, error=f"listing failed: {exc}", method=method)
        st.expected = self._expected = listing.items
        if listing.incomplete:
            st.errors.extend(listing.notes)
        if listing.uid_list_finds_unanswered:
            self._remember(node, "find_uid_lists_unanswered")
        if listing.not_honoured or listing.unverifiable:
            self._remember(node, "keys_filtered_on_our_side", sorted(listing.not_honoured | listing.unverifiable))
        if listing.unverifiable:
            st.errors.append(f"the PACS did not return {', '.join(sorted(listing.unverifiable))}: answers that "
                             f"could not be checked against the query were not retrieved ({listing.discarded})")
        self._record_items(st)
        self._sort_present(st, node)
        missing = [e for u, e in st.expected.items() if u not in st.present_at_start and u not in st.arrived]
        lists_refused = bool(capabilities(node).get("uid_lists_refused"))
        # batches small enough that every lane gets one (parallel associations are the lever: PITFALLS)
        studies = len({e.study_instance_uid for e in missing})
        per_lane = max(1, -(-studies // max(1, self._lanes(node))))
        units = plan_units(missing, st.expected, query_depth(query),
                           max_uids=1 if lists_refused else min(MAX_UIDS_PER_RETRIEVE, per_lane))
        self._update(expected=len(st.expected), skipped=len(st.present_at_start),
                     report={"finds": listing.finds, "find_splits": listing.splits, "units": len(units),
                             **listing.report()})
        self._notify(phase="fetching", expected=len(st.expected), skipped=len(st.present_at_start),
                     to_fetch=len(missing), units=len(units))
        try:
            self._fetch_all(client, node, method, units, st)
        except Exception as exc:  # noqa: BLE001
            log.exception("retrieval %s: fetch failed", self.id)
            st.errors.append(f"fetch failed: {exc}")
        finally:
            if self._sink is not None:
                self._sink.stop()
        return self._finish(st, t0, method=method, listing=listing)

    def _cancel_unstarted(self, why: str) -> Retrieval:
        with self.ctx.sessions() as s:
            r = s.get(Retrieval, self.id)
            r.status, r.error, r.finished_at = "cancelled", why, datetime.now(timezone.utc)
            r.report = {**(r.report or {}), **self.gate.report()}
            s.commit()
            s.refresh(r)
            s.expunge(r)
        return r

    def _sort_present(self, st: _State, node: PacsNode) -> None:
        """What is indexed already counts as `skipped` only when it came from this node (or from
        nowhere we know: a folder reindexed by hand). Arrived from this node since this retrieval was
        created: a run before a takeover brought it, so it is `received`. Sent by another AE (a forged
        or stale copy): fetched again, and the SCP compares the two copies (a different one is kept
        aside as a conflict, which this job then reports)."""
        with self.ctx.sessions() as s:
            rows = provenance(s, st.expected)
            created = s.scalar(select(Retrieval.created_at).where(Retrieval.id == self.id))
        created = _aware(created) if created else None
        for sop, (src, at) in rows.items():
            if src not in (None, node.name):
                st.verify.add(sop)
            elif src == node.name and created is not None and _aware(at) >= created:
                st.arrived.add(sop)
            else:
                st.present_at_start.add(sop)

    def _settle_verified(self, unit: Unit, res: RetrieveResult | None, st: _State, node: PacsNode) -> None:
        """Instances of `unit` that were indexed from another sender: the index cannot tell whether
        this node's copy came, so the PACS's answer and the conflicts table do."""
        mine = [u for u in unit.sops if u in st.verify and u not in st.arrived and u not in st.failed]
        if not mine:
            return
        with self.ctx.sessions() as s:
            conflicts = dict(s.execute(select(StoreConflict.sop_instance_uid, StoreConflict.reason)
                                       .where(StoreConflict.sop_instance_uid.in_(mine),
                                              StoreConflict.source_node == node.name)).all())
        sent = res is not None and not res.failed and not res.failed_uids and res.status in (0x0000, 0xB000)
        for u in mine:
            if u in conflicts:
                st.failed[u] = (f"conflict: this node's copy differs from the one indexed from another sender "
                                f"({conflicts[u]}); kept aside, see /api/v1/conflicts")
            elif sent:
                st.arrived.add(u)  # the same copy again: nothing to store, the index holds it

    def _record_items(self, st: _State) -> None:
        rows = [{"retrieval_id": self.id, "sop_instance_uid": e.sop_instance_uid,
                 "study_instance_uid": e.study_instance_uid, "series_instance_uid": e.series_instance_uid,
                 "state": "expected"} for e in st.expected.values()]
        with self.ctx.sessions() as s:
            s.execute(delete(RetrievalItem).where(RetrievalItem.retrieval_id == self.id))
            for i in range(0, len(rows), _CHUNK):
                s.execute(insert(RetrievalItem), rows[i:i + _CHUNK])
            s.commit()

    def _lanes(self, node: PacsNode) -> int:
        """Concurrent retrieves of this job: the node's association limit (policy max_associations,
        shared with every other job on the node through the gate's slots)."""
        return self.gate.limits.max_associations if self.gate is not None else 1

    def _attempt(self, client, node: PacsNode, method: str, unit: Unit, st: _State) -> _Attempt:
        """One retrieve and the wait for its arrivals (a lane's work: network and polling only; the
        job's bookkeeping stays with the dispatching thread)."""
        before = sum(1 for u in unit.sops if u in st.arrived)
        try:
            res = self._fetch(client, node, method, unit)
        except DicomError as exc:
            self._wait_arrivals(unit, st, None, grace=0.0 if isinstance(exc, PermanentDicomError)
                                else min(2.0, self.ctx.settings.arrival_timeout))
            return _Attempt(unit, None, exc, sum(1 for u in unit.sops if u in st.arrived) > before)
        self._wait_arrivals(unit, st, res)
        return _Attempt(unit, res, None, True)

    def _fetch_all(self, client, node: PacsNode, method: str, units: list[Unit], st: _State) -> None:
        try:
            self._fetch_units(client, node, method, units, st)
        except Cancelled as exc:  # the user's cancel, noticed at a wait: the job ends at a boundary
            self.cancelled = str(exc) or "cancelled by the user"

    def _fetch_units(self, client, node: PacsNode, method: str, units: list[Unit], st: _State) -> None:
        """Every unit, over up to `_lanes()` concurrent retrieves (associations); what one unit's failure
        costs is that unit's instances, never the job (only a PACS that cannot be reached, or a
        destination it does not know, stops it). Outcomes are handled one at a time, in this thread."""
        queue: deque[Unit] = deque(units)
        lanes = max(1, self._lanes(node))
        pending: dict = {}
        done = 0
        refusals = 0
        stop: tuple[str, bool] | None = None  # why no more retrieves are sent, and whether the rest failed
        with ThreadPoolExecutor(lanes, thread_name_prefix=f"retrieval-{self.id}") as pool:
            while pending or (queue and stop is None):
                while queue and stop is None and len(pending) < lanes:
                    self._check_control()
                    unit = queue.popleft()
                    pending[pool.submit(self._attempt, client, node, method, unit, st)] = unit
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    pending.pop(fut)
                    a = fut.result()  # a Cancelled from a lane's wait ends the job here
                    follow, refusals, why = self._handle(a, node, st, refusals)
                    queue.extendleft(reversed(follow))
                    if follow:
                        self._notify(units=self.progress.units + len(follow) - (a.error is not None))
                    stop = stop or why
                    done += 1
                    self._update(received=len(st.arrived), report=self._report(st))
                    self._notify(units_done=done, received=len(st.arrived))
        if stop is not None:
            why, fail_rest = stop
            if fail_rest:  # never asked: a refusal that stopped the job is theirs too
                for u in queue:
                    st.failed.update({sop: why for sop in u.sops if sop not in st.arrived})
            return
        if method == "move":
            self._retry_failed_by_get(client, node, st)

    def _handle(self, a: _Attempt, node: PacsNode, st: _State,
                refusals: int) -> tuple[list[Unit], int, tuple[str, bool] | None]:
        """One retrieve's outcome: (units to ask next, consecutive refusals, and when the job must
        stop: why, and whether what was not asked yet counts as failed (a refusal) or stays missing
        for a rerun (an unreachable PACS))."""
        unit, exc = a.unit, a.error
        if isinstance(exc, PermanentDicomError):
            status = getattr(exc, "status", None)
            self._count(st, getattr(exc, "result", None))
            smaller = _split(unit, st.expected, only={u for u in unit.sops if u not in st.arrived})
            # only a retrieve that cannot be split counts: a batch and its pieces are one piece of data
            refusals += not smaller
            # a destination the PACS does not know (a single UID: a list may be what it could not
            # parse), or every retrieve refused with nothing arriving: stop asking
            if (status == MOVE_DESTINATION_UNKNOWN and not unit.batched) or \
                    (refusals >= MAX_REFUSALS and not st.arrived):
                why = exc.message if refusals < MAX_REFUSALS else \
                    f"the PACS refused {refusals} retrieves in a row, stopping: {exc.message}"
                st.errors.append(why)
                st.failed.update({sop: exc.message for sop in unit.sops if sop not in st.arrived})
                return [], refusals, (exc.message, True)
            # a UID list some PACS cannot parse (0xA801 from pynetdicom's qrscp, 0xA900, 0xC000,
            # 0xC413): per study, then per series, before the unit is declared failed
            if smaller:
                if unit.batched:
                    self._remember(node, "uid_lists_refused")
                log.info("retrieval %s: %s refused (%s); retrying per %s", self.id, unit.describe(),
                         exc.message, smaller[0].level.lower())
                return smaller, refusals, None
            self._wait_arrivals(unit, st, None, grace=min(2.0, self.ctx.settings.arrival_timeout))
            st.errors.append(f"{unit.describe()}: {exc.message}")
            self._fail_unit(unit, st, exc.message)
            return [], refusals, None
        if isinstance(exc, RetriableDicomError):
            self._count(st, getattr(exc, "result", None))
            refusals = 0 if a.progressed else refusals + 1
            if getattr(exc, "unreachable", False) or refusals >= MAX_REFUSALS:
                # no association at all after the retry layer gave up (or every unit lost in a
                # row): the PACS is gone; what did not arrive stays missing for a rerun
                why = f"PACS unreachable during {unit.describe()}: {exc.message}"
                st.errors.append(why)
                return [], refusals, (why, False)
            if unit.batched:  # one study of the batch may be what breaks it: the others, one by one
                return _split(unit, st.expected, only={u for u in unit.sops if u not in st.arrived}), refusals, None
            # a status the retry layer gave up on (0xA7xx out of resources), or an association
            # aborted mid-retrieve: this unit failed, what arrived is kept, the job goes on
            st.errors.append(f"{unit.describe()}: {exc.message}")
            self._fail_unit(unit, st, exc.message)
            return [], refusals, None
        if exc is not None:
            raise exc
        res = a.result
        self._count(st, res)
        self._settle_verified(unit, res, st, node)
        self._record_subop_failures(unit, res, st)
        short = {u for u in unit.sops if u not in st.arrived and u not in st.failed}
        if short and unit.batched:
            # a PACS that ignores UID lists: ask again for what did not come, one by one
            log.info("retrieval %s: %d instance(s) of a batched %s did not arrive; asking per UID",
                     self.id, len(short), unit.level.lower())
            return _split(unit, st.expected, only=short), 0, None
        return [], 0, None

    def _record_subop_failures(self, unit: Unit, res: RetrieveResult, st: _State, prefix: str = "") -> int:
        """Failed sub-operations: the instances the PACS names (or, without a list, every one that
        did not come) failed, with the PACS's status and its meaning. Returns how many."""
        if not (res.failed_uids or res.failed):
            return 0
        why = f"{SUBOP_FAILED}: {res.failure}"
        named = [u for u in (res.failed_uids or unit.sops) if u in st.expected and u not in st.arrived]
        ours = self._refused_by_us(named)
        st.failed.update({u: why for u in named if u not in ours})
        st.failed.update({u: f"refused by our Storage SCP: {ours[u]}" for u in ours})
        if len(named) > len(ours):
            st.errors.append(f"{prefix}{unit.describe()}: {len(named) - len(ours)} instance(s) failed at the PACS, "
                             f"{res.failure}")
        for meaning in sorted(set(ours.values())):
            n = sum(1 for v in ours.values() if v == meaning)
            st.errors.append(f"{prefix}{unit.describe()}: {n} instance(s) refused by our own Storage SCP, not the "
                             f"PACS ({meaning}; the PACS answered {res.failure})")
        return len(named)

    def _fail_unit(self, unit: Unit, st: _State, why: str) -> None:
        """Every instance of a failed unit that did not arrive failed, for `why`, or because our own
        Storage SCP refused it (a PACS like Orthanc then stops the whole retrieve with 0xC000)."""
        left = [u for u in unit.sops if u not in st.arrived]
        ours = self._refused_by_us(left)
        st.failed.update({u: f"refused by our Storage SCP: {ours[u]}" if u in ours else why for u in left})
        for meaning in sorted(set(ours.values())):
            n = sum(1 for v in ours.values() if v == meaning)
            st.errors.append(f"{unit.describe()}: {n} instance(s) refused by our own Storage SCP, not the PACS "
                             f"({meaning})")

    def _refused_by_us(self, sops: list[str]) -> dict[str, str]:
        """Which of these instances our Storage SCP refused during this run (audit `dicom.refused`)."""
        if not sops:
            return {}
        with self.ctx.sessions() as s:
            since = s.scalar(select(Retrieval.started_at).where(Retrieval.id == self.id))
            q = select(AuditEvent.target, AuditEvent.details).where(AuditEvent.action == "dicom.refused",
                                                                    AuditEvent.target.in_(sops[:_CHUNK]))
            if since is not None:
                q = q.where(AuditEvent.at >= since)
            return {t: f"{d.get('status')} {d.get('meaning', '')}".strip() for t, d in s.execute(q)}

    def _retry_failed_by_get(self, client, node: PacsNode, st: _State) -> None:
        """Instances whose C-MOVE sub-operation failed (often a transfer syntax the PACS could not
        send us: C-MOVE leaves the choice of contexts to the PACS, C-GET lets us offer each one) are
        asked for once more, by C-GET, series by series."""
        todo = [u for u, why in st.failed.items() if why.startswith(SUBOP_FAILED) and u not in st.arrived]
        if not todo:
            return
        by_series: dict[tuple[str, str], list[str]] = {}
        for sop in todo:
            e = st.expected[sop]
            by_series.setdefault((e.study_instance_uid, e.series_instance_uid), []).append(sop)
        log.info("retrieval %s: %d failed instance(s); retrying them once by C-GET", self.id, len(todo))
        for (study, series), sops in by_series.items():
            unit = Unit("IMAGE", [study], [series], sops)
            self._check_control()
            try:
                res = self._fetch(client, node, "get", unit)
            except DicomError as exc:
                st.errors.append(f"retry by C-GET of {len(sops)} failed instance(s) refused: {exc.message}")
                continue
            self._wait_arrivals(unit, st, res, grace=min(2.0, self.ctx.settings.arrival_timeout))
            for u in sops:
                if u in st.arrived:
                    st.failed.pop(u, None)
            self._record_subop_failures(unit, res, st, prefix="retry by C-GET of ")
            st.retried_by_get += len(sops)

    def _check_control(self) -> None:
        """At every wait: the gate raises Cancelled here (and waits out a pause)."""
        if self.gate is not None:
            self.gate.check_control()

    def _remember_study_refusal(self, node: PacsNode) -> None:
        """A PACS that refused a study-level retrieve: later jobs ask per series from the start."""
        self._remember(node, "study_retrieve_refused")
        self._study_refused = True

    def _remember(self, node: PacsNode, capability: str, keys: list[str] | None = None) -> None:
        """Learn something about the node for later jobs (node.options["capabilities"]): a flag, or
        keys added to a list (e.g. the matching keys it did not honour)."""
        with self.ctx.sessions() as s:
            n = s.get(PacsNode, node.id)
            if n is None:
                return
            opts = dict(n.options or {})
            caps = dict(opts.get("capabilities") or {})
            new = True if keys is None else sorted(set(caps.get(capability) or []) | set(keys))
            if caps.get(capability) != new:
                caps[capability] = new
                opts["capabilities"] = caps
                n.options = opts
                s.commit()

    def _fetch(self, client, node: PacsNode, method: str, unit: Unit) -> RetrieveResult:
        """One unit, cut into the pieces the gate needs, each passing the gate and holding a slot.
        `method`: the job's, or "get" for the one retry of failed instances."""
        gate = self.gate
        assert gate is not None
        total = RetrieveResult(method=method)
        split = bool(gate.schedule.windows) or gate.limits_bytes is not None
        for piece in pieces(unit, self._expected, method, unit_max=gate.unit_max, split_batches=split,
                            study_refused=self._study_refused):
            gate.before_unit(len(piece.sops))
            try:
                with gate.association():
                    if method == "dicomweb":
                        res = self._fetch_dicomweb(client, node, piece)
                    else:
                        res = self._retrieve(client.inner if isinstance(client, GovernedClient) else client,
                                             node, method, piece)
            except PermanentDicomError as exc:
                gate.after_unit(ok=False)
                if piece.level == "STUDY" and not piece.batched and getattr(exc, "status", None) != 0xA801:
                    self._remember_study_refusal(node)  # the runner now retries per series
                raise
            except Exception:
                gate.after_unit(ok=False)
                raise
            gate.after_unit(ok=res.status == 0 and not res.failed, nbytes=self._bytes_of(piece))
            self._notify(phase=f"fetched {piece.describe()}")  # a boundary: where a pause would stop
            total.completed += res.completed
            total.failed += res.failed
            total.warning += res.warning
            total.failed_uids += res.failed_uids
            total.status = res.status or total.status
            total.comment = res.comment or total.comment
        return total

    def _bytes_of(self, unit: Unit) -> int:
        if self.gate is None or self.gate.limits_bytes is None:
            return 0
        with self.ctx.sessions() as s:
            return int(s.scalar(select(func.coalesce(func.sum(Instance.file_size), 0))
                                .where(Instance.sop_instance_uid.in_(unit.sops))) or 0)

    def _retrieve(self, client: DicomClient, node: PacsNode, method: str, unit: Unit) -> RetrieveResult:
        """One C-GET (into the job's store handler) or C-MOVE (to our Storage SCP)."""
        def pending(res: RetrieveResult) -> None:
            self._notify(phase=f"{method} {unit.describe()}")

        if method == "get":
            classes = sorted({c for c in (self._expected[u].sop_class_uid for u in unit.sops) if c})
            return client.get(unit.level, unit.keys, self._get_handler(node), sop_classes=classes or None,
                              on_pending=pending)
        return client.move(unit.level, unit.keys, on_pending=pending)

    def _get_handler(self, node: PacsNode):
        """C-GET arrivals go through the Storage SCP's own handler into the same store and index."""
        with self._handler_lock:  # lanes of one job share one handler and one index batcher
            return self._make_get_handler(node)

    def _make_get_handler(self, node: PacsNode):
        if self._store_handler is None:
            from app.dicom.scp import make_store_handler
            from app.store import DicomStore
            from app.index.sink import refusal_recorder

            sink = self._index_sink(node)
            # the C-GET peer is the node itself: a conflicting copy is recorded as coming from it
            self._store_handler = make_store_handler(DicomStore(self.ctx.settings.store_dir), sink,
                                                     lambda _ae, _host: node.name, conflicts=sink.record_conflict,
                                                     refused=refusal_recorder(self.ctx.sessions))
        return self._store_handler

    def _index_sink(self, node: PacsNode):
        """The job's one store -> extract -> index sink (C-GET and WADO-RS arrivals; started on first
        use, stopped at the end of the run), recording `node` as the sender."""
        if self._sink is None:
            from app.index.sink import IndexSink
            from app.labels.service import load_labeler

            s = self.ctx.settings
            self._sink = IndexSink(self.ctx.sessions, load_labeler(self.ctx.sessions, s.label_rules),
                                   pseudonym_key=s.get_pseudonym_key(), timeout=max(60.0, s.dicom_timeout),
                                   source_node=node.name).start()
        return self._sink

    def _fetch_dicomweb(self, client, node: PacsNode, unit: Unit) -> RetrieveResult:
        """One WADO-RS unit: each part kept like a C-STORE (app.dicomweb.ingest) through the index sink."""
        from app.dicomweb.ingest import PartRefused, store_part10

        dw = client.dw if isinstance(client, Both) else client.inner
        sink = self._dicomweb_sink(node)
        res = RetrieveResult(method="WADO-RS")
        wanted = set(unit.sops)
        for st in unit.studies:
            for raw in dw.iter_unit(unit.level, st, unit.series[0] if unit.series else None, unit.sops):
                try:
                    stored = store_part10(self._dw_store, raw, sink)
                except PartRefused as exc:
                    res.failed += 1
                    log.warning("retrieval %s: WADO-RS part refused: %s", self.id, exc)
                    continue
                if stored.sop_instance_uid in wanted:
                    res.completed += 1
        if res.failed:
            res.status = 0xB000
        return res

    def _dicomweb_sink(self, node: PacsNode):
        with self._handler_lock:  # the job's lanes share one sink and one index batcher
            if self._dw_store is None:
                from app.store import DicomStore

                self._dw_store = DicomStore(self.ctx.settings.store_dir)
            return self._index_sink(node)

    @staticmethod
    def _count(st: _State, res: RetrieveResult | None) -> None:
        if res is None:
            return
        st.subops["completed"] += res.completed
        st.subops["failed"] += res.failed
        st.subops["warning"] += res.warning
        st.statuses.append(f"0x{res.status:04X}")

    def _wait_arrivals(self, unit: Unit, st: _State, res: RetrieveResult | None, grace: float | None = None) -> None:
        """Poll the index until the unit's instances are there, the PACS's failures account for the
        rest, or nothing new arrived for `arrival_timeout` (stragglers of an asynchronous move)."""
        # an instance indexed from another sender is in the index already: only the PACS's answer and
        # the conflicts table settle it (_settle_verified)
        want = [u for u in unit.sops if u not in st.arrived and u not in st.verify]
        timeout = self.ctx.settings.arrival_timeout if grace is None else grace
        reported_failed = res.failed if res is not None else len(want)
        last_progress = time.monotonic()
        while True:
            with self.ctx.sessions() as s:
                got = present(s, want)
            if got:
                st.arrived.update(got)
                want = [u for u in want if u not in got]
                last_progress = time.monotonic()
                self._notify(received=len(st.arrived))
            if not want or len(want) <= reported_failed and res is not None:
                return
            if time.monotonic() - last_progress >= timeout:
                return
            self._check_control()
            time.sleep(POLL_S)

    def _report(self, st: _State, listing=None) -> dict:
        rep = {"suboperations": dict(st.subops), "statuses": st.statuses[-20:]}
        if st.failed:
            reasons: dict[str, int] = {}
            for why in st.failed.values():
                reasons[why] = reasons.get(why, 0) + 1
            rep["failure_reasons"] = reasons
        if st.retried_by_get:
            rep["retried_by_get"] = st.retried_by_get
        if listing is not None:
            rep.update(finds=listing.finds, find_splits=listing.splits, listing_complete=not listing.incomplete,
                       listing_s=self._listing_s, **listing.report())
        if self.gate is not None:
            rep.update(self.gate.report())
            rep["method"] = self.method
            if self._finds is not None:
                rep["capped_finds"] = self._finds.capped_answers
            if self.method_reason:
                rep["method_reason"] = self.method_reason
        return rep

    def _finish(self, st: _State, t0: float, *, error: str | None = None, method: str | None,
                listing=None) -> Retrieval:
        # the user's cancel stands even where no wait noticed it before the end (never `partial` over it)
        cancelled_meanwhile = self.gate is not None and self.gate.cancelled_now()
        r = self._settle(st, t0, error=error, method=self.method or method, listing=listing)
        if cancelled_meanwhile and not self.cancelled:
            self.cancelled = "cancelled by the user"
        if self.cancelled and r.status != "completed":
            with self.ctx.sessions() as s:
                s.execute(update(Retrieval).where(Retrieval.id == self.id).values(
                    status="cancelled", error=f"{self.cancelled} (stopped at a study/series boundary; "
                                              f"{r.received} received, {len(r.missing or [])} not fetched)"))
                s.commit()
            r = load_retrieval(self.ctx, self.id)
        return r

    def _settle(self, st: _State, t0: float, *, error: str | None, method: str | None, listing) -> Retrieval:
        """The job's end as the index tells it: received, skipped, failed, missing; one commit."""
        expected = set(st.expected)
        skipped = st.present_at_start & expected
        with self.ctx.sessions() as s:
            in_index = present(s, expected)
        # indexed from another sender and not confirmed from this node: not this job's to count
        unconfirmed = st.verify - st.arrived
        received = in_index - skipped - unconfirmed
        missing = sorted(expected - received - skipped)
        failed = [u for u in missing if u in st.failed]
        errors = ([error] if error else []) + st.errors
        if (error or errors) and not st.expected:
            status = "failed"
        elif not missing and not (listing is not None and listing.incomplete):
            status = "completed"
        elif not received and not skipped:
            status = "failed"
        else:
            status = "partial"
        if status != "completed" and missing and not errors:
            errors.append(f"{len(missing)} instance(s) did not arrive within {self.ctx.settings.arrival_timeout:g}s "
                          f"(sub-operations: {st.subops})")
        states = {u: "skipped" for u in skipped}
        states.update({u: "received" for u in received})
        states.update({u: "failed" for u in failed})
        states.update({u: "missing" for u in missing if u not in st.failed})
        report = self._report(st, listing)
        report["elapsed_s"] = round(time.monotonic() - t0, 3)
        with self.ctx.sessions() as s:
            for state in ("skipped", "received", "failed", "missing"):
                uids = [u for u, v in states.items() if v == state]
                for i in range(0, len(uids), _CHUNK):
                    s.execute(update(RetrievalItem)
                              .where(RetrievalItem.retrieval_id == self.id,
                                     RetrievalItem.sop_instance_uid.in_(uids[i:i + _CHUNK]))
                              .values(state=state))
            s.execute(update(Retrieval).where(Retrieval.id == self.id).values(
                status=status, method=method, expected=len(expected), received=len(received),
                skipped=len(skipped), failed=len(failed), missing=missing, failed_uids=failed,
                error="; ".join(errors)[:4000] or None, report=report, finished_at=datetime.now(timezone.utc)))
            s.commit()
        r = load_retrieval(self.ctx, self.id)
        self._notify(phase=status, expected=len(expected), skipped=len(skipped), received=len(received))
        log.info("retrieval %s %s: expected %d, received %d, skipped %d, missing %d", self.id, status,
                 len(expected), len(received), len(skipped), len(missing))
        return r


def run_retrieval(ctx: AppContext, retrieval_id: int, **kw) -> Retrieval:
    """Run under the node's policy (the default gate: windows, limits, backoff, pause/cancel),
    holding the retrieval's lease (app.retrievals.lease); one held by a live process elsewhere is
    left alone and returned as it stands. `kw`: RetrievalRunner's options."""
    with Lease(ctx, retrieval_id) as lease:
        if lease.held:
            return RetrievalRunner(ctx, retrieval_id, **kw).run()
    log.info("retrieval %s is held by another live process: not run here", retrieval_id)
    return load_retrieval(ctx, retrieval_id)


def load_retrieval(ctx: AppContext, retrieval_id: int) -> Retrieval:
    """The retrieval's row as it stands now, detached from its session."""
    with ctx.sessions() as s:
        r = s.get(Retrieval, retrieval_id)
        if r is None:
            raise LookupError(f"retrieval {retrieval_id} does not exist")
        s.expunge(r)
        return r
