"""Silent peers on the TLS listener (issue #18 item 1): a TCP connection that never starts (or never
finishes) its TLS handshake is closed at the handshake timeout and never keeps a registered
TLS sender out."""

from __future__ import annotations

import socket
import time

from app.wiring import storage_scp
from tests.conftest import testdata as sample_file
from tests.hardening.test_tls import _ctx, client_tls, pki, store_over_tls  # noqa: F401 (pki: a fixture)


def test_silent_tls_peers_are_closed_at_the_handshake_timeout_and_starve_nobody(tmp_path, pki):  # noqa: F811
    ctx = _ctx(tmp_path, pki, scp_handshake_timeout=2.0)
    server = storage_scp(ctx).start()
    try:
        silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        half = socket.create_connection(("127.0.0.1", server.port))
        half.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, then silence
        t0 = time.monotonic()
        assert store_over_tls(server.port, [sample_file("RG3_UNCR.dcm")], client_tls(pki)) == [0]
        assert time.monotonic() - t0 < 2.0
        deadline = time.monotonic() + 6
        for sk in silent + [half]:
            sk.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                while sk.recv(4096):
                    pass
            except ConnectionResetError:
                pass
            sk.close()  # a TimeoutError above fails the test: still open after the handshake timeout
        assert server.admission.counts()["pending"] == 0
    finally:
        server.stop()
        ctx.close()
