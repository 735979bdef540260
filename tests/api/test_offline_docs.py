"""/docs and /redoc work on an offline network: every asset they load is served by the app itself."""

from __future__ import annotations

import re

import pytest

from app.api import create_app
from tests.conftest import make_settings


def _assets(html: str) -> list[str]:
    return re.findall(r"""(?:src|href)=["']([^"']+)["']""", html) + re.findall(r"""url: *['"]([^'"]+)['"]""", html)


@pytest.mark.parametrize("tokens", [None, "tok-docs-1"])
def test_docs_pages_load_only_local_assets_and_each_is_served(tmp_path, tokens):
    from fastapi.testclient import TestClient

    from app.db.migrate import upgrade

    s = make_settings(tmp_path, api_tokens=tokens)
    upgrade(s.database_url)
    headers = {"Authorization": f"Bearer {tokens}"} if tokens else {}
    with TestClient(create_app(s)) as c:
        for page in ("/docs", "/redoc"):
            r = c.get(page, headers=headers)
            assert r.status_code == 200 and "text/html" in r.headers["content-type"]
            urls = _assets(r.text)
            scripts = [u for u in urls if u.endswith(".js")]
            assert scripts, f"{page} loads no script: {r.text[:500]}"
            for u in urls:
                assert u.startswith("/"), f"{page} loads {u} from outside the app"
                got = c.get(u, headers=headers)
                assert got.status_code == 200 and len(got.content) > 100, (page, u, got.status_code)
            assert "fonts.googleapis" not in r.text and "cdn." not in r.text
        if tokens:  # the assets are behind the token like every route but /health
            assert c.get("/static/api-docs/swagger-ui-bundle.js").status_code == 401
