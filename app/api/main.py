"""create_app(settings): routes are thin (parse -> service -> schema)."""

from __future__ import annotations

import importlib
import logging
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from sqlalchemy.exc import DataError, InterfaceError, OperationalError
from sqlalchemy import text

from app import __version__
from app.api.deps import require_token
from app.api.docs import mount_offline_docs
from app.api.gate import Gate
from app.config import Settings
from app.context import AppContext
from app.errors import RadcohortError
from app.web import ConsoleGate, is_console_path, mount_console

log = logging.getLogger("radcohort.api")

# one module per resource under app/api/routes, each exposing `router`
ROUTE_MODULES = ["pacs", "retrievals", "instances", "taxonomies", "cohorts", "training", "trained_models", "audit",
                 "conflicts", "labels", "worklists", "exports", "scoring", "jobs"]


def create_app(settings: Settings, ctx: AppContext | None = None) -> FastAPI:
    """Build the API around one AppContext (engine and settings made by the caller)."""
    ctx = ctx or AppContext.build(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        from app.jobs.runner import start_in_api

        # background work is durable jobs (app.jobs): this process runs them too unless
        # RADCOHORT_API_RUNS_JOBS=false (then only `radcohort worker` processes do)
        start_in_api(ctx)
        yield
        # the job runner and the other process-wide objects stop with the app
        ctx.close_shared()

    app = FastAPI(
        lifespan=lifespan,
        title="radcohort",
        version=__version__,
        description="PACS query/retrieve, header labels, leakage-free cohorts and CNN training.",
        # the docs pages are ours (packaged assets, app.api.docs): FastAPI's load them from a CDN,
        # blank on an offline hospital network; with tokens set the gate guards them like any route
        docs_url=None,
        redoc_url=None,
    )
    mount_offline_docs(app)
    # authentication, then the route's body limit, from the headers and before FastAPI reads or
    # validates a byte of the body (app.api.gate)
    # (the web console's pages also take its session cookie: app.web.ConsoleGate)
    app.add_middleware(Gate, settings=settings, console=ConsoleGate(settings))
    app.state.ctx = ctx

    def _console_error(req: Request, status: int, detail):
        """An error on a console page is a page (app.web), everywhere else the API's JSON."""
        if is_console_path(req.url.path):
            from app.web.render import error_page

            return error_page(req, status, detail)
        return None

    @app.exception_handler(RadcohortError)
    async def _domain_error(req: Request, exc: RadcohortError):
        return _console_error(req, exc.status_code, exc.message) or \
            JSONResponse(status_code=exc.status_code, content={"detail": exc.message})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(req: Request, exc: StarletteHTTPException):
        page = _console_error(req, exc.status_code, exc.detail)
        if page is not None:
            return page
        from fastapi.exception_handlers import http_exception_handler

        return await http_exception_handler(req, exc)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def _db_down(_req: Request, exc: Exception):
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(status_code=503, content={"detail": "database unavailable, retry later"})

    @app.exception_handler(OverflowError)
    @app.exception_handler(DataError)
    async def _out_of_range(req: Request, exc: Exception):
        # a number or text the database cannot hold is bad input, not a server fault: name the field
        # (SQLite overflows past 2**63-1, PostgreSQL INTEGER past 2**31-1)
        errors = []
        for where, params in (("path", req.path_params), ("query", req.query_params)):
            for k, v in params.items():
                try:
                    too_big = abs(int(v)) > 2**31 - 1
                except (TypeError, ValueError):
                    continue
                if too_big:
                    errors.append({"loc": [where, k], "msg": "number out of range", "type": "out_of_range"})
        detail = errors or f"a value is out of range for the database ({type(exc).__name__})"
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(RequestValidationError)
    async def _validation(req: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            errors.append({"loc": list(e.get("loc", ())), "msg": e.get("msg"), "type": e.get("type")})
        page = _console_error(req, 422, errors)
        if page is not None:
            return page
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.get("/health", tags=["health"])
    def health():
        db_ok = True
        try:
            with ctx.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - health must answer whatever the DB does
            db_ok = False
        from app.store import storage_health  # free space of the DICOM store (settings.health_min_free_mb)
        from app.training.workers import health as workers_health  # live workers, their queues and models

        storage = storage_health(settings.store_dir, settings.health_min_free_mb)
        return {"status": "ok" if db_ok and storage["ok"] else "degraded", "version": __version__,
                "database": db_ok, "storage": storage, "ae_title": settings.ae_title,
                "workers": workers_health(ctx)}

    for name in ROUTE_MODULES:
        module = importlib.import_module(f"app.api.routes.{name}")
        app.include_router(module.router, prefix="/api/v1", dependencies=[Depends(require_token)])
    # the web console at / (pages over the same services; not in the API's OpenAPI schema)
    mount_console(app, settings)
    return app
