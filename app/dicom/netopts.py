"""Socket options for DICOM associations on both ends (SCU and SCP).

DIMSE is a ping-pong of small PDUs, the worst case for Nagle's algorithm meeting delayed ACKs:
measured against Orthanc (DCMTK underneath) on loopback, every request/response exchange on a
pynetdicom association took ~45 ms (90 ms for a C-FIND without TCP_NODELAY), and 2.4 ms with
TCP_NODELAY on our end plus TCP_QUICKACK re-armed before each read (Linux resets it after use).
"""

from __future__ import annotations

import socket


def low_latency(assoc) -> None:
    """TCP_NODELAY, and TCP_QUICKACK before every read where the platform has it (Linux)."""
    try:
        wrapped = assoc.dul.socket
        sock = wrapped.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        return  # not a TCP socket we can tune (closed, or not there yet): only slower
    if not hasattr(socket, "TCP_QUICKACK") or getattr(wrapped, "_quickack", False):
        return
    recv = wrapped.recv

    def recv_quickack(nr_bytes: int):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return recv(nr_bytes)

    wrapped.recv = recv_quickack
    wrapped._quickack = True
