"""QIDO-RS / WADO-RS through `dicomweb-client`, shaped like the DIMSE client where the runner meets it.

`find()` answers like `DicomClient.find` (a FindResult of pydicom Datasets), so the retrieval
planner lists expected instances the same way over both protocols; QIDO is paged with
limit/offset, so a server-side result cap never truncates the listing. `instances_raw()` yields
each instance as the Part 10 bytes the server sent (`transfer-syntax=*`: as stored, no
transcoding); the library's public retrieve calls decode to Datasets, so its lower-level GET and
multipart decoder are used to keep the bytes.

HTTP failures map to the DIMSE error types: 429/5xx, connection errors and timeouts are
`RetriableDicomError` (and go through the same retry layer and its injectable sleep); other 4xx
are `PermanentDicomError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

import requests
from dicomweb_client.web import DICOMwebClient, _Transaction
from pydicom.dataset import Dataset

from app.dicom.queries import validate_query
from app.dicom.scu import FindResult
from app.errors import PermanentDicomError, RetriableDicomError
from app.retry import RetryPolicy

log = logging.getLogger("radcohort.dicomweb")

T = TypeVar("T")
PAGE = 500
ACCEPT_AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
RETRIABLE_HTTP = {408, 429, 500, 502, 503, 504}


class DicomwebNode:
    """One DICOMweb service (e.g. Orthanc's plugin at http://host:8042/dicom-web)."""

    def __init__(self, url: str, *, name: str = "", timeout: float = 30.0, retries: int = 3,
                 backoff: float = 0.5, max_backoff: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 page: int = PAGE):
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.client = DICOMwebClient(self.url, timeout=timeout)
        self.client.set_http_retry_params(retry=False)  # one retry layer: ours
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._sleep = sleep
        self.page = page

    # ------------------------------------------------------------------ retry layer
    def _call(self, op: str, fn: Callable[[], T]) -> T:
        return RetryPolicy(self.retries, self.backoff, self.max_backoff, self._sleep).run(
            op, lambda: self._map(op, fn), log)

    def _map(self, op: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else 0
            msg = f"{op} on {self.name}: HTTP {code}"
            if code in RETRIABLE_HTTP:
                raise RetriableDicomError(msg) from exc
            raise PermanentDicomError(msg) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RetriableDicomError(f"{op} on {self.name}: cannot reach the DICOMweb service "
                                      f"({type(exc).__name__})") from exc

    # ------------------------------------------------------------------ QIDO-RS
    def echo(self) -> float:
        """A one-result QIDO query; the round trip in milliseconds."""
        t0 = time.perf_counter()
        self._call("QIDO-RS", lambda: self.client.search_for_studies(limit=1, fields=["StudyInstanceUID"]))
        return (time.perf_counter() - t0) * 1000.0

    def find(self, level: str, query: Mapping[str, object] | None = None, *, root: str = "study",
             return_keys: tuple[str, ...] | list[str] | None = None) -> FindResult:
        """QIDO-RS at STUDY, SERIES or IMAGE level, every page; never capped."""
        q = validate_query(query or {})
        filters = {k: v for k, v in q.items() if v}
        fields = sorted(set(return_keys or ()) | {k for k, v in q.items() if not v})
        level = level.upper()
        study = filters.pop("StudyInstanceUID", None) if level in ("SERIES", "IMAGE") else None
        series = filters.pop("SeriesInstanceUID", None) if level == "IMAGE" else None
        if study and "\\" in study or series and "\\" in series:
            # a UID list cannot be a path segment: match it as a filter instead
            filters.update({k: v for k, v in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)) if v})
            study = series = None
        if level == "STUDY":
            search = lambda off: self.client.search_for_studies(  # noqa: E731
                limit=self.page, offset=off, fields=fields or None, search_filters=filters)
        elif level == "SERIES":
            search = lambda off: self.client.search_for_series(  # noqa: E731
                study_instance_uid=study, limit=self.page, offset=off, fields=fields or None, search_filters=filters)
        elif level == "IMAGE":
            search = lambda off: self.client.search_for_instances(  # noqa: E731
                study_instance_uid=study, series_instance_uid=series, limit=self.page, offset=off,
                fields=fields or None, search_filters=filters)
        else:
            raise PermanentDicomError(f"QIDO-RS has no {level} level (use STUDY, SERIES or IMAGE)")
        results: list[Dataset] = []
        offset = 0
        while True:
            page = self._call("QIDO-RS", lambda: search(offset)) or []
            results.extend(Dataset.from_json(item) for item in page)
            if len(page) < self.page:
                break
            offset += len(page)
        return FindResult(results, 0x0000, capped=False)

    # ------------------------------------------------------------------ WADO-RS
    def _get_parts(self, url: str) -> list[bytes]:
        resp = self.client._http_get(url, headers={"Accept": ACCEPT_AS_STORED})
        ctype = resp.headers.get("Content-Type", "")
        if ctype.startswith("application/dicom"):  # a server that sends one bare part
            return [resp.content]
        return [bytes(p) for p in self.client._decode_multipart_message(resp, stream=False)]

    def instance_raw(self, study: str, series: str, sop: str) -> bytes:
        url = self.client._get_instances_url(_Transaction.RETRIEVE, study, series, sop)
        parts = self._call("WADO-RS", lambda: self._get_parts(url))
        if len(parts) != 1:
            raise PermanentDicomError(f"WADO-RS on {self.name}: {len(parts)} parts for one instance")
        return parts[0]

    def series_raw(self, study: str, series: str) -> list[bytes]:
        url = self.client._get_series_url(_Transaction.RETRIEVE, study, series)
        return self._call("WADO-RS", lambda: self._get_parts(url))

    def study_raw(self, study: str) -> list[bytes]:
        url = self.client._get_studies_url(_Transaction.RETRIEVE, study)
        return self._call("WADO-RS", lambda: self._get_parts(url))

    def iter_unit(self, level: str, study: str, series: str | None, sops: list[str]) -> Iterator[bytes]:
        """The Part 10 bytes of a retrieval unit: a whole study, a whole series, or named instances."""
        if level == "STUDY":
            yield from self.study_raw(study)
        elif level == "SERIES":
            yield from self.series_raw(study, series or "")
        else:
            for sop in sops:
                yield self.instance_raw(study, series or "", sop)
