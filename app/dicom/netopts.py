"""Socket options for DICOM associations on both ends (SCU and SCP).

DIMSE is a ping-pong of small PDUs, the worst case for Nagle's algorithm meeting delayed ACKs:
measured against Orthanc (DCMTK underneath) on loopback, every request/response exchange on a
pynetdicom association took ~45 ms (90 ms for a C-FIND without TCP_NODELAY), and 2.4 ms with
TCP_NODELAY on our end plus TCP_QUICKACK re-armed before each read (Linux resets it after use).

Reads: pynetdicom reads a PDU 4096 bytes per socket.recv, so a 2.6 MB instance costs ~650 calls
through its Python loop (and our PDU guard): the Storage SCP spent more CPU there than anywhere
else. Reading up to 1 MB per call (never past the PDU: pynetdicom asks for its exact length) made
a 400-instance C-MOVE into `radcohort scp -p 2` 17-26 % faster on the development machine
(bench/bench_scp.py; 3 rounds, same run).
"""

from __future__ import annotations

import socket

READ_CHUNK = 1 << 20


def low_latency(assoc) -> None:
    """TCP_NODELAY, TCP_QUICKACK before every read where the platform has it (Linux), and reads of
    up to READ_CHUNK bytes."""
    try:
        wrapped = assoc.dul.socket
        sock = wrapped.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        return  # not a TCP socket we can tune (closed, or not there yet): only slower
    if getattr(wrapped, "_tuned", False):
        return
    quickack = hasattr(socket, "TCP_QUICKACK")

    def recv(nr_bytes: int) -> bytearray:
        """pynetdicom's AssociationSocket.recv (read `nr_bytes`, fewer only when the peer closed),
        in large reads."""
        if quickack:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass
        out = bytearray()
        while len(out) < nr_bytes:
            data = wrapped.socket.recv(min(nr_bytes - len(out), READ_CHUNK))
            if not data:  # the connection is gone: what was read, as pynetdicom does
                return out
            out += data
        return out

    wrapped.recv = recv
    wrapped._tuned = True
