"""Child processes of the demo: started in their own process group, logged to a file, always stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


class DemoError(RuntimeError):
    """A demo step failed; the message says which and where its log is."""


def log_tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


@dataclass
class Managed:
    """One long-running child (`radcohort serve`, `radcohort worker`)."""

    name: str
    argv: Sequence[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "Managed":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        # own session/process group: stop() can end the child and anything it spawned (torchrun, loaders)
        self.proc = subprocess.Popen(list(self.argv), env=self.env, cwd=self.cwd, stdout=log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(f"{self.name} exited with code {self.proc.returncode}; "
                            f"last lines of {self.log_path}:\n{log_tail(self.log_path)}")

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not ready yet (connection refused etc.)
                pass
            time.sleep(0.3)
        raise DemoError(f"{self.name}: {what} not ready after {timeout:.0f} s; see {self.log_path}:\n"
                        f"{log_tail(self.log_path)}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # the group may outlive its leader (data-loader children): make sure nothing is left
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self.proc = None


def run_step(name: str, argv: Sequence[str], env: dict[str, str], cwd: Path, log_path: Path,
             timeout: float) -> None:
    """Run one set-up command to completion (own process group, killed on timeout or interrupt)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            raise DemoError(f"{name} took more than {timeout:.0f} s; see {log_path}") from exc
        except BaseException:
            _kill_group(proc)
            raise
    if rc != 0:
        raise DemoError(f"{name} failed (exit {rc}): {' '.join(argv)}\nlast lines of {log_path}:\n"
                        f"{log_tail(log_path)}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
