"""Load figures for the hardening issue, each against a baseline run in the same process:

A. N small instances from 16 concurrent senders (half dcmtk storescu, half pynetdicom, each its own
   process) into `radcohort scp` (fsync + index row before Success) vs dcmtk `storescp --fork`
   (writes files only): instances/s, ratio, peak RSS of the SCP tree; all stored/indexed once.
B. One huge instance (default 500 MB) sent by storescu: peak SCP RSS growth with chunked receive
   (the default) vs in-memory receive (--no-chunked).
C. 4 retrievals (C-MOVE from a real Orthanc) and 2 cohort builds started at once while 4 threads
   read the API of `radcohort serve` (SQLite WAL, or --pg): failed requests, read latency vs an idle API.
D. One huge P-DATA PDU from a peer: peak SCP RSS (a known limit, see docs/hardening.md).

    .venv/bin/python bench/bench_load.py                  # the issue's sizes
    .venv/bin/python bench/bench_load.py --n 400 --big-mb 100 --skip-c
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.db.migrate import upgrade  # noqa: E402
from app.devtools.orthanc import OrthancServer, free_port  # noqa: E402
from tests.conftest import make_settings  # noqa: E402
from tests.hardening.loadkit import (ScpProcess, ServeProcess, api_under_jobs, check_store, dcmtk,  # noqa: E402
                                     scp_env, seed_orthanc, send_concurrently, sender_ctx, storescu, write_big,
                                     write_instances)


def _storescp(port: int, outdir: Path) -> subprocess.Popen:
    outdir.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([dcmtk("storescp"), "--fork", "-od", str(outdir), "-aet", "RADCOHORT", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return p


def phase_a(work: Path, n: int, senders: int, processes: int) -> None:
    print(f"\n== A. {n} instances, {senders} concurrent senders (half storescu, half pynetdicom)")
    files = write_instances(work / "gen", n)
    paths = [p for p, _ in files]
    port = free_port()
    base = _storescp(port, work / "storescp")
    try:
        b = send_concurrently(port, paths, senders=senders, aet="LOADER")
    finally:
        base.send_signal(signal.SIGTERM)
        base.wait(30)
    b_rate = b.ok / b.seconds
    print(f"baseline dcmtk storescp --fork (files only, no fsync, no index): {b.ok}/{n} in {b.seconds:.1f} s "
          f"= {b_rate:.0f} inst/s")
    for procs in sorted({1, processes}):
        s = make_settings(work / f"rc{procs}")
        ctx = sender_ctx(s)
        with ScpProcess(scp_env(s), s.scp_port, ["--processes", str(procs)]) as scp:
            r = send_concurrently(s.scp_port, paths, senders=senders, aet="LOADER")
        fig = check_store(ctx, {u for _, u in files})
        ctx.close()
        rate = r.ok / r.seconds
        print(f"radcohort scp --processes {procs} (fsync + indexed before Success): {r.ok}/{n} in {r.seconds:.1f} s "
              f"= {rate:.0f} inst/s, {rate / b_rate:.2f}x storescp; by sender {r.by_kind}; "
              f"SCP RSS idle {scp.baseline_rss_mb:.0f} MB, peak {scp.peak_rss_mb:.0f} MB (tree)")
        print(f"   store/index check: {fig}")
        ok = fig["files"] == fig["rows"] == fig["distinct_rows"] == n and not (
            fig["missing"] or fig["stray_files"] or fig["partial_files"])
        print(f"   all stored and indexed once, no partial or stray files: {ok}")


def phase_b(work: Path, mb: int) -> None:
    print(f"\n== B. one {mb} MB instance sent by storescu")
    big = work / "big.dcm"
    write_big(big, mb)
    growth = {}
    for mode in ("--chunked", "--no-chunked"):
        s = make_settings(work / f"big{mode}")
        sender_ctx(s).close()
        with ScpProcess(scp_env(s), s.scp_port, [mode]) as scp:
            ok, secs = storescu(s.scp_port, [big])
        growth[mode] = scp.peak_rss_mb - scp.baseline_rss_mb
        print(f"radcohort scp {mode}: stored {ok}/1 in {secs:.1f} s ({mb / secs:.0f} MB/s); RSS idle "
              f"{scp.baseline_rss_mb:.0f} MB, peak {scp.peak_rss_mb:.0f} MB, growth {growth[mode]:.0f} MB")
        shutil.rmtree(s.store_dir, ignore_errors=True)
    print(f"growth chunked / in-memory = {growth['--chunked'] / max(growth['--no-chunked'], 1):.3f}")
    big.unlink()


def phase_d(work: Path, mb: int) -> None:
    """A peer that sends one huge P-DATA PDU: pynetdicom reads a whole PDU into memory before any
    chunked receive can help, and we advertise no maximum PDU (RADCOHORT_MAX_PDU=0)."""
    import struct

    from pynetdicom import AE

    print(f"\n== D. one {mb} MB P-DATA-TF PDU (a peer ignoring or not needing a PDU limit)")
    s = make_settings(work / "pdu")
    sender_ctx(s).close()
    with ScpProcess(scp_env(s), s.scp_port) as scp:
        ae = AE("LOADER")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", s.scp_port, ae_title="RADCOHORT")
        sock = assoc.dul.socket.socket
        n = mb * 2**20
        sock.sendall(struct.pack(">BBI", 4, 0, n) + struct.pack(">IBB", n - 4, 1, 0))
        chunk, sent = b"\0" * 2**20, 6
        try:
            while sent < n:
                sock.sendall(chunk[:min(len(chunk), n - sent)])
                sent += len(chunk)
        except OSError:
            pass
        time.sleep(2)
        assoc.abort()
        time.sleep(1)
    print(f"SCP RSS idle {scp.baseline_rss_mb:.0f} MB, peak {scp.peak_rss_mb:.0f} MB "
          f"({(scp.peak_rss_mb - scp.baseline_rss_mb) / mb:.1f}x the PDU)")


def phase_c(work: Path, n: int, pg: str | None) -> None:
    backend = "PostgreSQL" if pg else "SQLite (WAL)"
    print(f"\n== C. 4 retrievals + 2 cohort builds at once while 4 threads read the API ({backend})")
    s = make_settings(work / "api", pg, dicom_timeout=30.0, arrival_timeout=10.0)
    upgrade(s.database_url)
    orthanc = OrthancServer(work / "orthanc", modalities={"radcohort": (s.ae_title, "127.0.0.1", s.scp_port)})
    orthanc.start()
    try:
        dates = ["20110301", "20120301", "20130301", "20140301"]
        expected = seed_orthanc(orthanc, work / "pacs", dates, series=2, per_series=25)
        import httpx

        with ServeProcess(scp_env(s), free_port()) as api:
            with httpx.Client(base_url=api.base) as c:
                for body in ({"name": "pacs", "ae_title": orthanc.aet, "host": "127.0.0.1",
                              "port": orthanc.dicom_port},
                             {"name": "loader", "ae_title": "LOADER", "host": "127.0.0.1", "port": 104}):
                    assert c.post("/api/v1/pacs-nodes", json=body).status_code == 201
            files = write_instances(work / "gen-c", n, prefix="C")
            sent = send_concurrently(s.scp_port, [p for p, _ in files], senders=8)
            print(f"indexed {sent.ok} instances first (8 senders, {sent.ok / sent.seconds:.0f} inst/s)")
            idle = api_under_jobs(api.base, "pacs", [], [], readers=4, min_seconds=5)  # baseline: reads alone
            cohort = {"taxonomy": "xr10", "per_class": max(1, n // 10), "split": {"train": 0.8, "test": 0.2}}
            out = api_under_jobs(api.base, "pacs", dates, [{**cohort, "seed": 1}, {**cohort, "seed": 2}], readers=4)
            log = api.log_text()
    finally:
        orthanc.stop()
    print(f"reads alone: {idle['reads']} reads, p50 {idle['read_p50_ms']} ms, p95 {idle['read_p95_ms']} ms")
    print(f"under jobs ({out['seconds']} s): {out['requests']} requests, {len(out['failures'])} failed, "
          f"{out['reads']} reads, p50 {out['read_p50_ms']} ms, p95 {out['read_p95_ms']} ms, max {out['read_max_ms']} ms; "
          f"p95 ratio vs idle {out['read_p95_ms'] / max(idle['read_p95_ms'] or 1, 0.1):.1f}x")
    for f in out["failures"][:5]:
        print("   FAILED", f)
    for d, rep in zip(dates, out["retrievals"]):
        print(f"   retrieval {d}: {rep and rep['status']} received {rep and rep['received']}/{len(expected[d])}")
    for res in out["cohorts"]:
        print(f"   cohort build: HTTP {res and res[0]} size {res and res[1].get('size')}")
    print(f"   'locked' in the server log: {'locked' in log.lower()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--senders", type=int, default=16)
    ap.add_argument("--processes", type=int, default=2, help="also run the SCP with this many processes")
    ap.add_argument("--big-mb", type=int, default=500)
    ap.add_argument("--pg", default=None, help="a PostgreSQL URL (an empty database) for phase C")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--skip-c", action="store_true")
    ap.add_argument("--pdu-mb", type=int, default=400, help="phase D: one PDU this large (0 = skip)")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        if not a.skip_a:
            phase_a(work, a.n, a.senders, a.processes)
        if not a.skip_b:
            phase_b(work, a.big_mb)
        if not a.skip_c:
            phase_c(work, a.n, a.pg)
        if a.pdu_mb:
            phase_d(work, a.pdu_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
