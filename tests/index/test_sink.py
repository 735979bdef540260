"""The one store -> extract -> index sink (app/index/sink.py): the same labeler wherever it is wired."""

from __future__ import annotations

from app.db.models import PacsNode
from app.labels.engine import BUILTIN_RULES
from app.labels.service import get_rules
from app.retrievals.runner import RetrievalRunner
from app.wiring import index_sink, storage_scp


def test_scp_cget_and_wado_sinks_label_with_the_configured_rules(ctx, tmp_path):
    """C-GET and WADO-RS arrivals once took the built-in rules while the SCP took RADCOHORT_LABEL_RULES."""
    rules = tmp_path / "site-rules.yaml"
    rules.write_text(BUILTIN_RULES.read_text().replace("name: builtin", "name: site", 1))
    ctx.settings.label_rules = rules
    want = get_rules(rules).version
    assert want.startswith("site-") and want != get_rules(None).version

    scp = storage_scp(ctx)
    assert scp.sink.labeler.version == want
    assert index_sink(ctx).labeler.version == want
    node = PacsNode(name="pacs", ae_title="PACS", host="127.0.0.1", port=104)
    runner = RetrievalRunner(ctx, 1)
    sink = runner._index_sink(node)  # what the C-GET handler and the WADO-RS path write through
    try:
        assert sink.labeler.version == want and sink.source_node == "pacs"
    finally:
        sink.stop()
