"""API core: health, auth on every /api/v1 route, validation errors."""

from fastapi.testclient import TestClient

from app.api import create_app


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_tokens_guard_every_api_route(ctx):
    ctx.settings.api_tokens = "s3cret,other"
    app = create_app(ctx.settings, ctx)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        paths = {p: ops for p, ops in app.openapi()["paths"].items() if p.startswith("/api/v1")}
        assert paths, "no /api/v1 routes registered"
        for template, ops in paths.items():
            path = template.replace("{", "x").replace("}", "")
            for method in ops:
                r = c.request(method.upper(), path)
                assert r.status_code == 401, (method, template, r.status_code)
                r = c.request(method.upper(), path, headers={"Authorization": "Bearer wrong"})
                assert r.status_code == 401, (method, template)
        assert c.get("/api/v1/audit", headers={"Authorization": "Bearer other"}).status_code == 200
        # /health is the only open route: the schema and the docs need the token too
        for path in ("/openapi.json", "/docs", "/redoc"):
            assert c.get(path).status_code == 401, path  # the gate answers before routing (no 404 hint)
        r = c.get("/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and "/api/v1/audit" in r.json()["paths"]
        assert c.get("/docs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
