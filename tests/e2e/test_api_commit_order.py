"""The API over a real socket: a write is committed before its answer is sent.

FastAPI's default `scope="request"` runs a yield dependency's exit code (our commit, in
app/api/deps.get_session) *after* the response has gone out. A client's next request can then miss
the write it was just told succeeded (seen in the demo: DELETE 204, then POST of the same name 409),
and a commit that fails would follow a 2xx. Slowing every commit down makes that window certain.
"""

from __future__ import annotations

import threading
import time

import httpx
from sqlalchemy import event

from app.api import create_app
from app.devtools.orthanc import free_port


def test_write_is_committed_before_the_response(ctx):
    import uvicorn

    @event.listens_for(ctx.engine, "commit")
    def _slow_commit(conn):  # runs just before the DBAPI commit
        time.sleep(0.5)

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ctx.settings, ctx), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        body = {"name": "n", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "retrieve_method": "move"}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            assert c.post("/api/v1/pacs-nodes", json=body).status_code == 201
            assert c.get("/api/v1/pacs-nodes/n").status_code == 200, "the created node is not visible yet"
            assert c.delete("/api/v1/pacs-nodes/n").status_code == 204
            assert c.get("/api/v1/pacs-nodes/n").status_code == 404, "the deleted node is still there"
    finally:
        server.should_exit = True
        thread.join(10)
