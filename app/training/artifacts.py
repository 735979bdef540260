"""The run directory's files: progress tailing, results, report and artifact lookup (read side, no torch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from app import __version__
from app.errors import NotFound

ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.(png|svg|json|md|csv|txt|html)$")
MEDIA_TYPES = {"png": "image/png", "svg": "image/svg+xml", "json": "application/json",
               "md": "text/markdown; charset=utf-8", "csv": "text/csv; charset=utf-8",
               "txt": "text/plain; charset=utf-8", "html": "text/html; charset=utf-8"}


class ProgressTail:
    """Reads new complete lines of progress.jsonl since the last call (a half-written last line waits)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0

    def read(self) -> list[dict]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size < self.offset:  # the run rewrote the file (e.g. after a resume): read it again
            self.offset = 0
        if size == self.offset:
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read(size - self.offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for line in chunk[: end + 1].splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue  # a torn line from a killed run; the next epoch's event supersedes it
            if isinstance(ev, dict):
                events.append(ev)
        return events


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json_atomic(path: Path, data: dict) -> None:
    """Write via a temp file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run_finished(run_dir: Path) -> bool:
    """True when a previous attempt finished the run (done event and metrics written) before its worker died."""
    if read_json(run_dir / "metrics.json") is None:
        return False
    tail = ProgressTail(run_dir / "progress.jsonl")
    return any(ev.get("event") == "done" for ev in tail.read())


def error_text(run_dir: Path, returncode: int) -> str:
    """error.txt of the run, else the end of the worker's log of it."""
    err = run_dir / "error.txt"
    if err.exists():
        text = err.read_text(errors="replace").strip()
        if text:
            return text[-8000:]
    log = run_dir / "worker.log"
    tail = log.read_text(errors="replace")[-4000:].strip() if log.exists() else ""
    return f"training exited with status {returncode}" + (f"; log tail:\n{tail}" if tail else "")


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def artifact_path(run_dir: Path, name: str) -> Path:
    """A report artifact by plain file name (no paths, only report file types)."""
    if not ARTIFACT_NAME.match(name):
        raise NotFound(f"artifact {name!r} not found (plain names of .png/.json/.md/.csv/.txt/.html only)")
    path = run_dir / name
    if not path.is_file():
        raise NotFound(f"artifact {name!r} not found")
    return path


def list_artifacts(run_dir: Path) -> list[str]:
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.is_file() and ARTIFACT_NAME.match(p.name)
                  and p.name not in ("spec.json",))


def media_type(name: str) -> str:
    return MEDIA_TYPES.get(name.rsplit(".", 1)[-1], "application/octet-stream")


def link_images(markdown: str, names: list[str]) -> str:
    """Point the report's image links (`](confusion.png)`, next to report.md on disk) at `artifacts/NAME`,
    so they resolve from GET /api/v1/training-jobs/{id}/report to the artifact route."""
    for name in names:
        markdown = markdown.replace(f"]({name})", f"](artifacts/{name})")
    return markdown
