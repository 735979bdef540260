"""The composition root for the receiving side: stages built from a context and handed to each other.

The transport (app.dicom) knows no database; the index knows no network. Here the Storage SCP is
given the index writer as its sink, the configured PACS nodes as its peer lookup, and its
recorders; the CLI (`radcohort serve`/`scp`/`retrieve`), the tests and the demo build it here.
"""

from __future__ import annotations

from app.context import AppContext
from app.dicom.scp import StorageSCP
from app.index.ingest import Labeler
from app.index.sink import IndexSink, NodeDirectory, refusal_recorder
from app.labels.service import load_labeler


def index_sink(ctx: AppContext, labeler: Labeler | None = None, *, load_labels: bool = True,
               source_node: str | None = None) -> IndexSink:
    """The store -> extract -> index sink over this context's database (not started).

    The labeler is loaded from settings.label_rules unless one is given (or `load_labels` is False)."""
    s = ctx.settings
    if labeler is None and load_labels:
        labeler = load_labeler(ctx.sessions, s.label_rules)
    return IndexSink(ctx.sessions, labeler, pseudonym_key=s.get_pseudonym_key(),
                     timeout=max(60.0, s.dicom_timeout), source_node=source_node)


def storage_scp(ctx: AppContext, *, port: int | None = None, fsync: bool = True, labeler: Labeler | None = None,
                load_labels: bool = True, chunked: bool = False) -> StorageSCP:
    """Our Storage SCP writing into this context's store and index (not started)."""
    sink = index_sink(ctx, labeler, load_labels=load_labels)
    return StorageSCP(ctx.settings, sink, NodeDirectory(ctx.sessions, ctx.settings.scp_check_host),
                      conflicts=sink.record_conflict, refused=refusal_recorder(ctx.sessions), port=port,
                      fsync=fsync, chunked=chunked)
