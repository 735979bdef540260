"""Association slots (issue #18 item 1): silent connections never starve registered senders.

Raw TCP sockets that connect and send nothing (or half a PDU), against the real StorageSCP; a
registered pynetdicom sender must still store. Measured figures are printed (pytest -s).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from pynetdicom import AE

from app.wiring import storage_scp
from tests.dicom.helpers import CR_STORAGE, make_cr
from tests.dicom.test_scp import SENDER, add_node, count, send

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the SCP closes `sock` (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except (TimeoutError, socket.timeout):
        return False


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.fixture
def scp(ctx):
    ctx.settings.scp_handshake_timeout = 2.0
    add_node(ctx, "sender", SENDER)
    server = storage_scp(ctx).start()
    yield server
    server.stop()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def test_registered_sender_stores_while_64_idle_connections_are_open(ctx, scp):
    base_threads = threading.active_count()
    rss0 = _rss_mb()
    idle = [_connect(scp.port) for _ in range(64)]
    time.sleep(1.2)  # silent for longer than Admission.grace: a newer connection from their address closes them
    t0 = time.monotonic()
    assert send(scp.port, [make_cr()]) == [0]
    latency = time.monotonic() - t0
    assert count(ctx) == 1
    # the idle ones hold no association slot, and their address keeps at most max_pending_per_peer waiting
    counts = scp.admission.counts()
    # (the rest were evicted by newer connections from their address, or closed at the handshake
    # timeout if the machine was slow: either way none waits, which the next lines prove)
    assert counts["pending"] <= ctx.settings.scp_max_pending_per_peer
    print(f"\n64 idle sockets: store latency {latency * 1000:.0f} ms, SCP RSS +{_rss_mb() - rss0:.1f} MB, "
          f"threads +{threading.active_count() - base_threads}, pending {counts['pending']}")
    # every idle socket is closed by the SCP within the handshake timeout (2 s here) plus slack
    t0 = time.monotonic()
    assert all(_closed_by_peer(s, 5.0) for s in idle)
    print(f"all 64 closed by the SCP {time.monotonic() - t0:.1f} s after the store")
    for s in idle:
        s.close()
    assert _wait(lambda: scp.admission.counts()["pending"] == 0, 3.0)
    assert _wait(lambda: threading.active_count() <= base_threads + 2, 5.0), threading.active_count()


def test_slots_are_freed_at_once_when_the_attacker_closes(ctx, scp):
    ctx.settings.scp_handshake_timeout = 30.0  # not the timeout: the close itself must free them
    scp.stop()
    server = storage_scp(ctx).start()
    try:
        socks = [_connect(server.port, f"127.0.0.{2 + i % 4}") for i in range(24)]  # 4 addresses x 6
        assert _wait(lambda: server.admission.counts()["pending"] == 24, 3.0)
        t0 = time.monotonic()
        for s in socks:
            s.close()
        assert _wait(lambda: server.admission.counts()["pending"] == 0, 2.0), server.admission.counts()
        freed = time.monotonic() - t0
        # their association threads end too (they were waiting for an A-ASSOCIATE-RQ)
        assert _wait(lambda: not server._server.active_associations, 3.0)
        print(f"\n24 pending slots freed {freed * 1000:.0f} ms after the attacker closed")
        assert send(server.port, [make_cr()]) == [0]
    finally:
        server.stop()


def test_per_peer_address_limit_closes_that_address_oldest_only(ctx, scp):
    ctx.settings.scp_handshake_timeout = 30.0  # only the limit closes connections here
    scp.stop()
    server = storage_scp(ctx).start()
    limit = ctx.settings.scp_max_pending_per_peer
    try:
        others = [_connect(server.port, "127.0.0.3") for _ in range(3)]
        old = [_connect(server.port, "127.0.0.2") for _ in range(limit)]
        time.sleep(1.2)  # silent past Admission.grace
        flood = [_connect(server.port, "127.0.0.2") for _ in range(limit)]
        # each newer connection from that address closed one of its silent older ones, at once
        assert all(_closed_by_peer(s, 1.0) for s in old)
        assert not any(_closed_by_peer(s, 0.1) for s in flood)
        # another address is not affected by that flood
        assert not any(_closed_by_peer(s, 0.1) for s in others)
        assert server.admission.counts()["pending"] == limit + 3
        flood += old
        assert send(server.port, [make_cr()]) == [0]
        for s in flood + others:
            s.close()
    finally:
        server.stop()


def test_half_sent_association_request_is_cut_at_the_handshake_timeout(ctx, scp):
    s = _connect(scp.port)
    s.sendall(b"\x01\x00" + (100000).to_bytes(4, "big") + b"\x00\x01\x00\x00RADCOHORT")  # then silence
    t0 = time.monotonic()
    assert _closed_by_peer(s, 6.0)
    assert time.monotonic() - t0 < 4.5  # 2 s handshake timeout, not the 60 s network timeout
    s.close()


def test_association_limit_counts_registered_associations_only(ctx, scp):
    ctx.settings.scp_max_associations = 2
    scp.stop()
    server = storage_scp(ctx).start()
    held = []
    try:
        idle = [_connect(server.port, "127.0.0.4") for _ in range(6)]
        for _ in range(2):
            ae = AE(SENDER)
            ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
            a = ae.associate("127.0.0.1", server.port, ae_title="RADCOHORT")
            assert a.is_established
            held.append(a)
        ae = AE(SENDER)
        ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
        third = ae.associate("127.0.0.1", server.port, ae_title="RADCOHORT")
        # rejected-transient, local limit exceeded: the registered slots are what is full
        assert third.is_rejected
        assert third.acceptor.primitive.result == 0x02 and third.acceptor.primitive.diagnostic == 0x02
        held.pop().release()
        assert _wait(lambda: server.admission.counts()["associations"] == 1, 3.0)
        assert send(server.port, [make_cr()]) == [0]
        for s in idle:
            s.close()
    finally:
        for a in held:
            a.release()
        server.stop()


def test_unknown_calling_ae_does_not_take_a_slot(ctx, scp):
    ctx.settings.scp_max_associations = 1
    scp.admission.max_associations = 1
    strangers = []
    for i in range(5):
        ae = AE(f"STRANGER{i}")
        ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
        a = ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT")
        assert a.is_rejected
        assert a.acceptor.primitive.result == 0x01  # permanent: calling AE not recognised
        strangers.append(a)
    assert scp.admission.counts()["associations"] == 0
    assert send(scp.port, [make_cr()]) == [0]


def test_memory_with_many_idle_connections_stays_small(ctx, scp):
    """256 idle sockets from 32 addresses: accepted at once (listen backlog), no thread each (they wait
    in the gate), the SCP's resident memory (this process) stays within a few MB."""
    rss0, threads0 = _rss_mb(), threading.active_count()
    t0 = time.monotonic()
    socks = [_connect(scp.port, f"127.0.1.{1 + i % 32}") for i in range(256)]
    connected = time.monotonic() - t0
    time.sleep(0.5)
    held = _rss_mb() - rss0  # resident now, with every socket open (VmRSS, not a lifetime peak)
    pending, threads = scp.admission.counts()["pending"], threading.active_count() - threads0
    t0 = time.monotonic()
    assert send(scp.port, [make_cr()]) == [0]
    latency = time.monotonic() - t0
    print(f"\n256 idle sockets: connected in {connected:.1f} s, RSS +{held:.1f} MB while open, "
          f"threads +{threads}, pending {pending}, a store {latency * 1000:.0f} ms")
    assert connected < 10  # with socketserver's backlog of 5 they took 40 s (SYN retries)
    assert threads <= 4  # one gate thread, not two pynetdicom threads per connection
    assert held < 32
    assert pending <= 32 * ctx.settings.scp_max_pending_per_peer
    for s in socks:
        s.close()


def test_a_burst_of_32_registered_senders_from_one_address_all_get_through(ctx, scp):
    """The per-address limit (8 before the AE check) does not hurt a real sender's burst: each sends
    its A-ASSOCIATE-RQ at once, so it passes the check long before 8 newer connections arrive."""
    results: list = []

    def one(i: int) -> None:
        try:
            results.append(send(scp.port, [make_cr(seed=i)]))
        except AssertionError:  # send() asserts the association was established
            results.append("refused")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count([0]) == 32, results
    assert scp.admission.counts()["evicted"] == 0 and count(ctx) == 32


def test_made_up_calling_ae_titles_do_not_query_the_database_each(ctx, scp):
    """The node check reads the node table at most once per 2 s, whatever AE titles arrive."""
    from sqlalchemy import event

    queries: list[str] = []

    def seen(conn, cursor, statement, *args):
        if "pacs_nodes" in statement:
            queries.append(statement)

    event.listen(ctx.engine, "before_cursor_execute", seen)
    try:
        t0 = time.monotonic()
        for i in range(40):
            ae = AE(f"MADEUP{i}")
            ae.add_requested_context(CR_STORAGE, EXPLICIT_LE)
            assert ae.associate("127.0.0.1", scp.port, ae_title="RADCOHORT").is_rejected
        took = time.monotonic() - t0
    finally:
        event.remove(ctx.engine, "before_cursor_execute", seen)
    assert len(queries) <= took / 2.0 + 1, (len(queries), took)
    assert send(scp.port, [make_cr()]) == [0]
