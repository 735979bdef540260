"""What durability costs a Storage SCP: per-file fdatasync against a group commit, same run, same disk.

K concurrent "associations" (threads) each receive M files of --mb MB in 256 KB chunks into the
store's directory and make each one durable before "answering":

- `per-file`: fdatasync of the file, link into place, fsync of its directory (what app.store does);
- `per-file + early write-back`: the same, with sync_file_range(WRITE) queued every 1 MB while the
  file arrives (app.store.EarlyWriteback, what the chunked receive does);
- `group commit`: the file is linked into place and handed to one flusher thread, which makes every
  file handed to it since its last round durable with one syncfs(2) of the store's filesystem, then
  answers them all (the usual group-commit shape; concurrent associations share a flush).
- `none`: no durability (the ceiling).

Prints files/s and the mean wait of the durable step, as ratios to `per-file` in the same run.

    .venv/bin/python bench/bench_fsync.py              # 2 and 8 writers, 50 files each, 100 MB/s each
    .venv/bin/python bench/bench_fsync.py --writers 2 4 8 16 --pace 0 --dir /path/on/the/store/disk
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.store import EarlyWriteback, _fsync_dir  # noqa: E402

CHUNK = 256 * 1024
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class GroupFlusher:
    """One thread; each round makes everything handed to it durable with one syncfs."""

    def __init__(self, root: Path):
        self.root_fd = os.open(root, os.O_RDONLY)
        self.q: queue.Queue = queue.Queue()
        self.rounds = 0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def commit(self) -> None:
        ev = threading.Event()
        self.q.put(ev)
        ev.wait()

    def _run(self) -> None:
        while True:
            first = self.q.get()
            if first is None:
                return
            batch = [first]
            while True:
                try:
                    nxt = self.q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.q.put(None)
                    break
                batch.append(nxt)
            syncfs(self.root_fd)
            self.rounds += 1
            for ev in batch:
                ev.set()

    def close(self) -> None:
        self.q.put(None)
        self.t.join()
        os.close(self.root_fd)


def receive(root: Path, w: int, files: int, payload: bytes, mode: str, flusher: GroupFlusher | None,
            waits: list[float], pace: float) -> None:
    incoming, final_dir = root / ".incoming", root / f"w{w}"
    final_dir.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        tmp = incoming / f"w{w}-{i}.part"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        wb = EarlyWriteback(fd) if mode == "per-file + early write-back" else None
        t0 = time.perf_counter()
        for k in range(0, len(payload), CHUNK):
            if pace:  # the chunks arrive at the network's pace, as from a PACS
                time.sleep(max(0.0, t0 + k / pace - time.perf_counter()))
            os.write(fd, payload[k:k + CHUNK])
            if wb is not None:
                wb.wrote(min(CHUNK, len(payload) - k))
        t = time.perf_counter()
        if mode.startswith("per-file"):
            os.fdatasync(fd)
        os.close(fd)
        os.link(tmp, final_dir / f"{i}.dcm")
        os.unlink(tmp)
        if mode.startswith("per-file"):
            _fsync_dir(final_dir)
        elif mode == "group commit":
            assert flusher is not None
            flusher.commit()
        waits.append(time.perf_counter() - t)


def run(base: Path, writers: int, files: int, payload: bytes, mode: str, pace: float) -> tuple[float, float, int]:
    root = base / f"store-{writers}-{mode.replace(' ', '_')}"
    (root / ".incoming").mkdir(parents=True)
    os.sync()  # start from a clean page cache: no other run's dirty pages in the way
    flusher = GroupFlusher(root) if mode == "group commit" else None
    waits: list[float] = []
    threads = [threading.Thread(target=receive, args=(root, w, files, payload, mode, flusher, waits, pace))
               for w in range(writers)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    rounds = flusher.rounds if flusher else 0
    if flusher:
        flusher.close()
    shutil.rmtree(root)
    os.sync()
    return writers * files / dt, sum(waits) / len(waits) * 1000, rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--files", type=int, default=50, help="files per writer")
    ap.add_argument("--mb", type=float, default=2.6)
    ap.add_argument("--pace", type=float, default=100.0,
                    help="MB/s at which each writer's chunks arrive (0: as fast as memory); Orthanc sends one "
                         "association at 50-150 MB/s on the development machine")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    ap.add_argument("--dir", type=Path, default=None, help="a directory on the disk to measure (default: temp)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-fsync-", dir=args.dir))
    payload = os.urandom(int(args.mb * 1e6))
    modes = ["per-file", "per-file + early write-back", "group commit", "none"]
    try:
        print(f"{args.files} files of {args.mb} MB per writer arriving at {args.pace or 'unlimited'} MB/s each, "
              f"best of {args.rounds}, {os.cpu_count()} CPUs, {base}")
        for writers in args.writers:
            best = {m: (0.0, float("inf"), 0) for m in modes}
            for _ in range(args.rounds):
                for m in modes:
                    rate, wait, rounds = run(base, writers, args.files, payload, m, args.pace * 1e6)
                    b = best[m]
                    best[m] = (max(b[0], rate), min(b[1], wait), rounds if rate > b[0] else b[2])
            ref = best["per-file"][0]
            print(f"\n{writers} concurrent writers")
            for m in modes:
                rate, wait, rounds = best[m]
                extra = f"  ({rounds} syncfs for {writers * args.files} files)" if m == "group commit" else ""
                print(f"  {m:30s} {rate:7.1f} files/s  {rate / ref:5.2f}x per-file  "
                      f"durable step {wait:6.2f} ms mean{extra}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
