"""The retrieval runner under the node's policy: the runner's steps, passed through the Governor.

`GovernedRunner` subclasses `RetrievalRunner` and changes only where it touches the PACS:
- before starting: wait for the transfer window (or the user's resume); cancel ends it there;
- every retrieve unit is cut at study/series boundaries (and to the instance bucket's size when a
  rate limit is set) and each piece passes `Governor.before_unit`: user pause/cancel, window,
  adaptive backoff, token buckets; each runs holding one of the node's association slots;
- the SCU's retry sleeps go through the Governor, so every 0xA7xx / refused association /
  timeout is counted and slows the following units;
- the method comes from the node's protocol and its probe (DICOMweb, or C-GET where C-MOVE cannot
  reach us), and a detected silent C-FIND cap marks answers of that size as capped;
- the report gets the Governor's figures; a cancelled job ends `cancelled`.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from sqlalchemy import func, select, update

from app.db.models import Instance, PacsNode, Retrieval
from app.dicom.scu import DicomClient, FindResult, RetrieveResult
from app.errors import PermanentDicomError
from app.policy.clock import Clock
from app.policy.governor import Cancelled, Governor
from app.probe.probe import find_caps_by_level, preferred_method
from app.retrievals.runner import RetrievalRunner, Unit, load_retrieval

log = logging.getLogger("radcohort.policy")


class GovernedClient:
    """A DIMSE or DICOMweb client whose finds hold an association slot and honour a known cap.

    A PACS that truncates at its cap and still says Success is caught by the known cap (policy, or
    the probe): an answer of that size counts as capped, so the hierarchical listing
    (app.retrievals.expected) splits the study level by date and reports a capped series.
    """

    def __init__(self, inner, gate: Governor, caps: dict[str, int | None]):
        self.inner, self.gate = inner, gate
        self.caps = caps
        self.capped_answers = 0

    def find(self, level, query=None, **kw) -> FindResult:
        with self.gate.association():
            res = self.inner.find(level, dict(query or {}), **kw)
        cap = self.caps.get("IMAGE" if str(level).upper() == "IMAGE" else "OTHER")
        if cap and not res.capped and len(res.results) >= cap:
            res.capped = True
        self.capped_answers += bool(res.capped)
        return res


def _unit(level: str, study: str, series: str | None, sops: list[str]) -> Unit:
    return Unit(level, [study], [series] if series else [], sops)


class GovernedRunner(RetrievalRunner):
    def __init__(self, ctx, retrieval_id: int, *, clock: Clock | None = None, poll_s: float = 2.0, **kw):
        super().__init__(ctx, retrieval_id, **kw)
        self.clock = clock
        self.poll_s = poll_s
        self.gate: Governor | None = None
        # RetrievalRunner.method: a caller's override (CLI --method); else chosen in run()
        self._forced_method = getattr(self, "method", None)
        self.method_reason: str | None = None
        self.cancelled: str | None = None
        self._dw_store = None
        self._user_factory = kw.get("client_factory")
        self._study_refused = False
        self.client_factory = self._make_client

    # --------------------------------------------------------------- set-up
    def _make_client(self, node: PacsNode):
        opts = node.options or {}
        if self.method == "dicomweb":
            from app.dicomweb.client import DicomwebNode

            inner = DicomwebNode(opts["dicomweb_url"], name=node.name, timeout=self.ctx.settings.dicom_timeout,
                                 retries=self.ctx.settings.dicom_retries, sleep=self.gate.retry_sleep)
            if (opts.get("protocol") == "both"):
                # listing over C-FIND, retrieval over WADO-RS
                self._client = GovernedClient(self._dimse(node), self.gate, find_caps_by_level(opts))
                return _Both(self._client, inner)
            # Orthanc's QIDO truncates at its limit silently, offset or not: only a known cap
            # (policy, or the probe of the same server over DIMSE) reveals it
            self._client = GovernedClient(inner, self.gate, find_caps_by_level(opts))
            return self._client
        self._client = GovernedClient(self._dimse(node), self.gate, find_caps_by_level(opts))
        return self._client

    def _dimse(self, node):
        if self._user_factory is not None:
            return self._user_factory(node)
        return DicomClient(self.ctx.settings, node, sleep=self.gate.retry_sleep)

    def run(self) -> Retrieval:
        with self.ctx.sessions() as s:
            r = s.get(Retrieval, self.id)
            if r is None:
                raise LookupError(f"retrieval {self.id} does not exist")
            node = s.scalar(select(PacsNode).where(PacsNode.name == r.node_name))
            if node is not None:
                s.expunge(node)
        if node is None:
            return super().run()  # the runner reports the missing node
        self.gate = Governor(self.ctx, node, self.id, clock=self.clock, poll_s=self.poll_s)
        self._study_refused = bool(((node.options or {}).get("capabilities") or {}).get("study_retrieve_refused"))
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
        return super().run()

    def _cancel_unstarted(self, why: str) -> Retrieval:
        with self.ctx.sessions() as s:
            r = s.get(Retrieval, self.id)
            r.status, r.error, r.finished_at = "cancelled", why, datetime.now(timezone.utc)
            r.report = {**(r.report or {}), **self.gate.report()}
            s.commit()
            s.refresh(r)
            s.expunge(r)
        return r

    def _update(self, **values) -> None:
        """The runner's own `status=running` must not undo a pause or cancel that came meanwhile."""
        if "report" in values and self.gate is not None:
            values["report"] = {**(values["report"] or {}), **self.gate.report()}
        if values.get("status") != "running":
            return super()._update(**values)
        with self.ctx.sessions() as s:
            rest = {k: v for k, v in values.items() if k != "status"}
            s.execute(update(Retrieval).where(Retrieval.id == self.id).values(**rest))
            s.execute(update(Retrieval).where(Retrieval.id == self.id, Retrieval.status.in_(("queued", "running")))
                      .values(status="running"))
            s.commit()

    def _remember_study_refusal(self, node) -> None:
        """A PACS that refused a study-level retrieve: later jobs ask per series from the start."""
        self._remember(node, "study_retrieve_refused")
        self._study_refused = True

    def _check_control(self) -> None:
        if self.gate is not None:
            self.gate.check_control()

    def _lanes(self, node) -> int:
        """Concurrent retrieves of this job: the node's association limit (policy max_associations,
        shared with every other job on the node through the gate's slots)."""
        return self.gate.limits.max_associations if self.gate is not None else 1

    # --------------------------------------------------------------- per unit
    def _pieces(self, unit: Unit, method: str) -> list[Unit]:
        """Cut a unit at study/series boundaries (when windows need them, and for WADO-RS), and to
        the instance bucket's size."""
        size = self.gate.unit_max
        if unit.level == "STUDY" and self._study_refused and not size:
            groups: dict[tuple[str, str], list[str]] = {}
            for sop in unit.sops:
                e = self._expected[sop]
                groups.setdefault((e.study_instance_uid, e.series_instance_uid), []).append(sop)
            return [_unit("SERIES", st, se, sops) for (st, se), sops in groups.items()]
        # a batch (several studies/series as one UID-list retrieve, much faster on small studies)
        # is kept whole unless transfer windows need study/series boundaries to stop at, or the
        # byte bucket needs pieces to pace (it is charged after each piece with what arrived)
        split_batches = unit.batched and (bool(self.gate.schedule.windows) or self.gate.limits_bytes is not None)
        if not split_batches and not size and (method != "dicomweb" or unit.level == "IMAGE"):
            return [unit]
        groups: dict[tuple[str, str], list[str]] = {}
        for sop in unit.sops:
            e = self._expected[sop]
            groups.setdefault((e.study_instance_uid, e.series_instance_uid), []).append(sop)
        if not size:
            if unit.level == "STUDY" and method != "dicomweb":
                by_study: dict[str, list[str]] = {}
                for (st, _se), sops in groups.items():
                    by_study.setdefault(st, []).extend(sops)
                return [_unit("STUDY", st, None, sops) for st, sops in by_study.items()]
            level = "IMAGE" if unit.level == "IMAGE" else "SERIES"
            return [_unit(level, st, se, sops) for (st, se), sops in groups.items()]
        out = []
        for (st, se), sops in groups.items():
            for i in range(0, len(sops), size):
                out.append(_unit("IMAGE", st, se, sops[i:i + size]))
        return out

    def _fetch(self, client, node, method, unit: Unit) -> RetrieveResult:
        """`method`: the job's (self.method), or "get" for the runner's one retry of failed instances."""
        total = RetrieveResult(method=method)
        for piece in self._pieces(unit, method):
            self.gate.before_unit(len(piece.sops))
            try:
                with self.gate.association():
                    if method == "dicomweb":
                        res = self._fetch_dicomweb(client, node, piece)
                    else:
                        res = super()._fetch(client.inner if isinstance(client, GovernedClient) else client,
                                             node, method, piece)
            except PermanentDicomError as exc:
                self.gate.after_unit(ok=False)
                if piece.level == "STUDY" and not piece.batched and getattr(exc, "status", None) != 0xA801:
                    self._remember_study_refusal(node)  # the runner now retries per series
                raise
            except Exception:
                self.gate.after_unit(ok=False)
                raise
            self.gate.after_unit(ok=res.status == 0 and not res.failed, nbytes=self._bytes_of(piece))
            self._notify(phase=f"fetched {piece.describe()}")  # a boundary: where a pause would stop
            total.completed += res.completed
            total.failed += res.failed
            total.warning += res.warning
            total.failed_uids += res.failed_uids
            total.status = res.status or total.status
            total.comment = res.comment or total.comment
        return total

    def _bytes_of(self, unit: Unit) -> int:
        if self.gate.limits_bytes is None:
            return 0
        with self.ctx.sessions() as s:
            return int(s.scalar(select(func.coalesce(func.sum(Instance.file_size), 0))
                                .where(Instance.sop_instance_uid.in_(unit.sops))) or 0)

    def _fetch_dicomweb(self, client, node, unit: Unit) -> RetrieveResult:
        from app.dicomweb.ingest import PartRefused, store_part10

        dw = client.dw if isinstance(client, _Both) else client.inner
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

    def _dicomweb_sink(self, node):
        with self._handler_lock:  # the job's lanes share one sink and one index batcher
            if self._dw_store is None:
                from app.dicom.store import DicomStore

                self._dw_store = DicomStore(self.ctx.settings.store_dir)
            return self._index_sink(node)

    # --------------------------------------------------------------- report and end
    def _report(self, st, listing=None) -> dict:
        rep = super()._report(st, listing)
        if self.gate is not None:
            rep.update(self.gate.report())
            rep["method"] = self.method
            client = getattr(self, "_client", None)
            if isinstance(client, GovernedClient):
                rep["capped_finds"] = client.capped_answers
            if self.method_reason:
                rep["method_reason"] = self.method_reason
        return rep

    def _fetch_all(self, client, node, method, units, st) -> None:
        try:
            super()._fetch_all(client, node, method, units, st)
        except Cancelled as exc:
            self.cancelled = str(exc) or "cancelled by the user"

    def _finish(self, st, t0, *, error=None, method=None, listing=None) -> Retrieval:
        # the user's cancel stands even where no wait noticed it before the end (never `partial` over it)
        cancelled_meanwhile = self.gate is not None and self.gate.cancelled_now()
        r = super()._finish(st, t0, error=error, method=self.method or method, listing=listing)
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


class _Both:
    """protocol 'both': C-FIND for the listing, WADO-RS for the instances."""

    def __init__(self, dimse: GovernedClient, dw):
        self.dimse, self.dw = dimse, dw

    def find(self, level, query=None, **kw):
        return self.dimse.find(level, query, **kw)
