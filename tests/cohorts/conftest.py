"""A small labelled index with known traps, built through the real labeler on either backend."""

from __future__ import annotations

import pytest
from cohort_index import build_index


@pytest.fixture
def index(any_ctx):
    with any_ctx.sessions() as s:
        return build_index(s, any_ctx.settings.store_dir)
