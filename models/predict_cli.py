"""The API's predictor process, and a one-shot prediction.

    python -m models.predict_cli --serve RUN_DIR    # warm: load once, answer requests until told to stop
    python -m models.predict_cli RUN_DIR FILE       # one-shot: one JSON line on stdout

The API never imports torch: it keeps one `--serve` process per model (app.training.predict.PredictorPool)
and talks to it over the process's stdin/stdout in frames: a 4-byte big-endian length, then that many bytes
of UTF-8 JSON. The child writes frames only on a private copy of its stdout (anything printed goes to
stderr, which the API keeps in a log file).

    child -> {"event": "ready", "pid", "load_seconds", "classes", "image_size", "threads", "device"}
             or {"event": "failed", "kind": "no_torch" | "load", "error"} and exit 4 / 1
    {"op": "predict", "path": FILE} -> {"ok": true, "class", "confidence", "probabilities", "seconds"}
                                       or {"ok": false, "kind": "bad_input" | "error", "error"}
    {"op": "ping"} -> {"ok": true, "pid"};  {"op": "exit"}, end of stdin or the parent's death -> exit 0

One-shot exit codes: 0 with {"class", "confidence", "probabilities"}; 2 with {"error"} when the file cannot
be read as an image; 4 when torch (the [worker] extra) is missing; 1 on any other failure.

This module imports no torch at import time: the API imports the framing functions below.
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
import threading
import time
from pathlib import Path

EXIT_BAD_INPUT, EXIT_NO_TORCH = 2, 4
MAX_FRAME = 16 * 1024 * 1024
_HEADER = struct.Struct(">I")
NO_TORCH = "predictions need the [worker] extra (torch) on the API machine"


class FrameTimeout(Exception):
    """No complete frame arrived before the deadline."""


class FrameError(Exception):
    """A frame that cannot be read (too long, not JSON): the peer is not speaking the protocol."""


def encode_frame(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes over the {MAX_FRAME} limit")
    return _HEADER.pack(len(body)) + body


def write_frame(fd: int, obj: dict) -> None:
    """Write one frame (BrokenPipeError when the reader is gone)."""
    view = memoryview(encode_frame(obj))
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """n bytes from fd; None at end of file before the first byte; FrameTimeout past the deadline."""
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise FrameTimeout()
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            if not buf:
                return None
            raise FrameError(f"end of stream inside a frame ({len(buf)} of {n} bytes)")
        buf += chunk
    return bytes(buf)


def read_frame(fd: int, deadline: float | None = None) -> dict | None:
    """The next frame's JSON object; None at a clean end of stream."""
    head = _read_exact(fd, _HEADER.size, deadline)
    if head is None:
        return None
    (size,) = _HEADER.unpack(head)
    if size > MAX_FRAME:
        raise FrameError(f"frame of {size} bytes over the {MAX_FRAME} limit")
    body = _read_exact(fd, size, deadline) if size else b""
    if body is None:
        raise FrameError("end of stream after a frame header")
    try:
        obj = json.loads(body)
    except ValueError as exc:
        raise FrameError(f"frame is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError("frame is not a JSON object")
    return obj


# ---------------------------------------------------------------- the warm predictor process
def _exit_with_parent(parent: int) -> None:
    """Exit when the parent (the API process) is gone, even if it died without closing our stdin."""

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def serve(run_dir: Path) -> int:
    out = os.dup(1)  # the protocol's stream; stdout itself goes to stderr from here on
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    parent = int(os.environ.get("RADCOHORT_PREDICTOR_PARENT") or os.getppid())
    if os.getppid() != parent:
        return 0
    _exit_with_parent(parent)
    try:
        import torch
    except ImportError:
        write_frame(out, {"event": "failed", "kind": "no_torch", "error": NO_TORCH})
        return EXIT_NO_TORCH
    threads = int(os.environ.get("RADCOHORT_PREDICT_THREADS") or 0)  # the API's predict_threads
    if threads > 0:
        torch.set_num_threads(threads)
    from pydicom.errors import InvalidDicomError

    from models.predict import Classifier
    from models.preprocess import PreprocessError

    try:
        model_path = run_dir / "model.pt"
        if not model_path.is_file():
            raise FileNotFoundError(f"no model.pt in {run_dir}")
        clf = Classifier(model_path, "cpu")
        clf.warm_up()
    except Exception as exc:  # noqa: BLE001 - reported to the API as the first frame
        write_frame(out, {"event": "failed", "kind": "load",
                          "error": f"the model could not be loaded: {type(exc).__name__}: {exc}"[:500]})
        return 1
    write_frame(out, {"event": "ready", "pid": os.getpid(), "load_seconds": round(clf.load_seconds, 3),
                      "classes": clf.classes, "image_size": clf.image_size, "threads": torch.get_num_threads(),
                      "device": str(clf.device)})
    while True:
        try:
            req = read_frame(0)
        except FrameError as exc:
            print(f"predictor: unreadable request, exiting: {exc}", file=sys.stderr)
            return 1
        if req is None or req.get("op") == "exit":
            return 0
        if req.get("op") == "ping":
            write_frame(out, {"ok": True, "pid": os.getpid()})
            continue
        if req.get("op") != "predict" or not isinstance(req.get("path"), str):
            write_frame(out, {"ok": False, "kind": "error", "error": f"unknown request {str(req)[:200]}"})
            continue
        t0 = time.perf_counter()
        try:
            answer = {"ok": True, **clf.predict_file(req["path"])}
        except (PreprocessError, InvalidDicomError) as exc:  # the upload is at fault
            answer = {"ok": False, "kind": "bad_input", "error": f"cannot read the image: {exc}"[:500]}
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the process
            answer = {"ok": False, "kind": "error",
                      "error": f"prediction failed: {type(exc).__name__}: {exc}"[:500]}
        answer["seconds"] = round(time.perf_counter() - t0, 4)
        write_frame(out, answer)


# ---------------------------------------------------------------- one-shot
def one_shot(run_dir: Path, dicom_path: Path) -> int:
    try:
        import torch  # noqa: F401  (fail clearly when the worker extra is missing)
    except ImportError:
        print(json.dumps({"error": NO_TORCH}))
        return EXIT_NO_TORCH
    from pydicom.errors import InvalidDicomError

    from models.predict import predict_file
    from models.preprocess import PreprocessError

    try:
        result = predict_file(run_dir, dicom_path)
    except (PreprocessError, InvalidDicomError) as exc:  # the upload is at fault
        print(json.dumps({"error": f"cannot read the image: {exc}"[:500]}))
        return EXIT_BAD_INPUT
    except Exception as exc:  # noqa: BLE001 - reported to the caller as one JSON line
        print(json.dumps({"error": f"prediction failed: {type(exc).__name__}: {exc}"[:500]}))
        return 1
    print(json.dumps({"class": result["class"], "confidence": float(result["confidence"]),
                      "probabilities": {k: float(v) for k, v in result["probabilities"].items()}}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "--serve":
        return serve(Path(args[1]))
    if len(args) == 2 and not args[0].startswith("-"):
        return one_shot(Path(args[0]), Path(args[1]))
    print(json.dumps({"error": "usage: python -m models.predict_cli RUN_DIR FILE | --serve RUN_DIR"}))
    return 1


if __name__ == "__main__":
    sys.exit(main())
