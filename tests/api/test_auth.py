"""Authentication before anything else, token scopes, per-route body limits (issue #18, items 2 and 7).

Against the real app (app.api.gate.Gate in front of FastAPI); the memory proof with a real server
process is in test_auth_memory.py.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.api import create_app
from app.config import Settings
from app.tokens import DEFAULT_SCOPES, SCOPES, parse_tokens
from tests.conftest import _migrated_ctx, make_settings

PLAIN, READER, FINDER = "plain-tok", "reader-tok", "finder-tok"
TOKENS = f"{PLAIN},reader:{READER}:read,finder:{FINDER}:read+find-identified"


@pytest.fixture
def guarded(tmp_path):
    """A client on an app with one plain and two named tokens; JSON bodies limited to 4 KiB."""
    s = make_settings(tmp_path, api_tokens=TOKENS, api_max_body_kb=4, predict_max_upload_mb=1)
    for ctx in _migrated_ctx(s):
        with TestClient(create_app(s, ctx)) as c:
            yield c


def _auth(token) -> dict:
    return {"Authorization": b"Bearer " + (token if isinstance(token, bytes) else token.encode())}


def test_unauthenticated_invalid_body_is_401_not_422(guarded):
    """Validation runs after authentication: no schema errors for a caller without a token."""
    bad = {"taxonomy": 12, "per_class": "many", "split": "nope"}
    r = guarded.post("/api/v1/cohorts", json=bad)
    assert r.status_code == 401 and r.json() == {"detail": "missing or invalid bearer token"}
    assert r.headers["www-authenticate"] == "Bearer"
    r = guarded.post("/api/v1/cohorts", json=bad, headers=_auth("wrong"))
    assert r.status_code == 401
    r = guarded.post("/api/v1/cohorts", json=bad, headers=_auth(PLAIN))
    assert r.status_code == 422 and {e["loc"][-1] for e in r.json()["detail"]} >= {"taxonomy", "per_class"}


def test_unauthenticated_oversized_body_is_401_not_413(guarded):
    r = guarded.post("/api/v1/cohorts", content=b"{" * 100_000, headers={"Content-Type": "application/json"})
    assert r.status_code == 401


@pytest.mark.parametrize("header", [
    b"Bearer \xff\xfe\xfd",                      # latin-1 bytes, not UTF-8
    "Bearer jälkeen".encode("latin-1"),
    "Bearer 山田".encode("utf-8"),
    b"Bearer " + PLAIN.encode() + b"\xe9",       # a valid token plus one byte
    b"Bearer",                                   # no token at all
    b"Basic " + PLAIN.encode(),                  # right secret, wrong scheme
    b"Bearer  " + PLAIN.encode() + b" extra",
    b"\x00\x01",
])
def test_any_byte_string_as_token_is_401_never_500(guarded, header):
    r = guarded.get("/api/v1/audit", headers={"Authorization": header})
    assert r.status_code == 401, r.text
    assert r.json()["detail"] == "missing or invalid bearer token"


def test_bearer_scheme_is_case_insensitive_and_every_token_form_works(guarded):
    for h in (b"Bearer " + PLAIN.encode(), b"bearer " + PLAIN.encode(), b"BEARER " + READER.encode(),
              b"Bearer " + FINDER.encode()):
        assert guarded.get("/api/v1/audit", headers={"Authorization": h}).status_code == 200, h


def test_health_is_the_only_open_route(guarded):
    assert guarded.get("/health").status_code == 200
    for path in ("/docs", "/redoc", "/openapi.json", "/no-such-page", "/api/v1/no-such-route"):
        assert guarded.get(path).status_code == 401, path
    assert guarded.get("/docs", headers=_auth(PLAIN)).status_code == 200
    assert guarded.get("/openapi.json", headers=_auth(READER)).status_code == 200


def test_audit_actor_names_the_token_without_revealing_it(guarded):
    r = guarded.post("/api/v1/pacs-nodes", json={"name": "n1", "ae_title": "N1", "host": "127.0.0.1", "port": 104},
                     headers=_auth(READER))
    assert r.status_code == 201, r.text
    r = guarded.post("/api/v1/pacs-nodes", json={"name": "n2", "ae_title": "N2", "host": "127.0.0.1", "port": 104},
                     headers=_auth(PLAIN))
    assert r.status_code == 201, r.text
    audit = guarded.get("/api/v1/audit", headers=_auth(PLAIN))
    actors = {e["target"]: e["actor"] for e in audit.json()["items"] if e["action"] == "pacs_node.create"}
    assert actors["n1"] == "token:reader"
    assert actors["n2"].startswith("token:") and len(actors["n2"]) == len("token:") + 12
    assert PLAIN not in audit.text and READER not in audit.text


# ------------------------------------------------------------------ body limits per route

def test_json_routes_refuse_a_body_over_their_limit_from_content_length(guarded):
    body = b'{"name": "' + b"x" * 5000 + b'", "classes": []}'
    r = guarded.post("/api/v1/taxonomies", content=body,
                     headers={**_auth(PLAIN), "Content-Type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]


def test_json_routes_refuse_a_streamed_body_over_their_limit(guarded):
    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b" " * 1000

    r = guarded.post("/api/v1/taxonomies", content=chunks(),
                     headers={**_auth(PLAIN), "Content-Type": "application/json"})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]
    # under the limit the same route parses and validates as usual
    r = guarded.post("/api/v1/taxonomies", json={"name": "x", "classes": []}, headers=_auth(PLAIN))
    assert r.status_code == 422


def test_only_the_upload_route_takes_the_upload_limit(guarded):
    """600 KB is over the JSON limit (4 KiB) but under the predict limit (1 MB): the upload route reads
    it (and answers about the unknown model), a JSON route refuses it."""
    payload = b"\0" * 600_000
    r = guarded.post("/api/v1/models/999/predict", files={"file": ("x.dcm", payload, "application/dicom")},
                     headers=_auth(PLAIN))
    assert r.status_code == 404, r.text
    r = guarded.post("/api/v1/models/999/predict",
                     files={"file": ("x.dcm", b"\0" * (3 * 2**20), "application/dicom")}, headers=_auth(PLAIN))
    assert r.status_code == 413 and str(2 * 2**20) in r.json()["detail"]
    r = guarded.post("/api/v1/cohorts", content=payload, headers={**_auth(PLAIN), "Content-Type": "application/json"})
    assert r.status_code == 413


# ------------------------------------------------------------------ token syntax and scopes

def test_plain_tokens_keep_their_meaning():
    (t,) = parse_tokens(" tok1 ")
    assert t.secret == b"tok1" and t.scopes == DEFAULT_SCOPES
    assert "find-identified" not in t.scopes and "export-identified" not in t.scopes
    assert {"read", "retrieve", "train", "export"} <= t.scopes
    named = parse_tokens("a,alice:s3cret:read+find-identified,")
    assert [x.actor for x in named][1] == "token:alice" and named[1].scopes == {"read", "find-identified"}
    assert Settings(_env_file=None, api_tokens="a,b").tokens == ["a", "b"]
    assert set(SCOPES) == {"read", "retrieve", "train", "export", "find-identified", "export-identified"}


@pytest.mark.parametrize("raw, words", [
    ("alice:s3cret", "name:token:scope1+scope2"),
    ("alice:s3cret:read:x", "name:token:scope1+scope2"),
    ("alice:s3cret:read+admin", "unknown or missing scope(s) ['admin']"),
    ("alice:s3cret:", "unknown or missing scope"),
    ("al ice:s3cret:read", "name must be"),
    ("a:x:read,a:y:read", "duplicate name 'a'"),
    ("tök", "visible ASCII"),
    ("ok,alice:sec ret:read", "entry 2 (alice)"),
])
def test_malformed_token_settings_fail_at_startup_with_a_clear_message(raw, words):
    with pytest.raises(ValidationError) as e:
        Settings(_env_file=None, api_tokens=raw)
    msg = str(e.value)
    assert words in msg, msg
    assert "s3cret" not in msg and "sec ret" not in msg  # the message never echoes a secret


def test_require_scope_refuses_unknown_scope_names():
    from app.api.deps import require_scope

    with pytest.raises(ValueError, match="unknown scope"):
        require_scope("admin")


def test_require_scope_guards_a_route_by_the_callers_token(tmp_path):
    """The structure other routes use to enforce `export`, `train` ...: 403 without the scope."""
    from fastapi import Depends

    from app.api.deps import get_actor, require_scope

    s = make_settings(tmp_path, api_tokens=f"{PLAIN},ex:ex-tok:read+export-identified")
    for ctx in _migrated_ctx(s):
        app = create_app(s, ctx)

        @app.get("/api/v1/_needs_export_identified", dependencies=[Depends(require_scope("export-identified"))])
        def _probe(actor: str = Depends(get_actor)):
            return {"actor": actor}

        with TestClient(app) as c:
            r = c.get("/api/v1/_needs_export_identified", headers=_auth(PLAIN))
            assert r.status_code == 403 and "export-identified" in r.json()["detail"]
            r = c.get("/api/v1/_needs_export_identified", headers=_auth("ex-tok"))
            assert r.status_code == 200 and r.json() == {"actor": "token:ex"}
            assert c.get("/api/v1/_needs_export_identified").status_code == 401
