"""The processes a benchmark run starts, and what ``/proc`` says they cost.

Every server runs as a child process on a free loopback port; ``Server.stop`` sends
SIGTERM, waits, then SIGKILLs, so a run leaves nothing behind. CPU is read from
``/proc/<pid>/stat`` (user + system time) before and after a cell and summed over a
process tree (the gateway's supervisor and its workers); memory from
``/proc/<pid>/status`` ``VmRSS``, sampled by a thread during the cell, summed over
the tree at each sample. Linux only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

__all__ = [
    "MemorySampler",
    "Server",
    "cpu_seconds",
    "free_port",
    "machine_busy_seconds",
    "rss_bytes",
    "tree",
]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the kernel's choice: never 8001/8080)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` now; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, pending = [], [pid]
    while pending:
        current = pending.pop(0)
        found.append(current)
        pending.extend(sorted(children.get(current, [])))
    return found


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, not idle or iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    # guest time is already counted in user time.
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class MemorySampler:
    """Peak of the summed RSS of some processes, sampled every ``interval`` seconds.

    ``with MemorySampler(lambda: pids) as sampler: ...``; then ``sampler.peak``.
    """

    def __init__(self, pids: Callable[[], Sequence[int]], interval: float = 0.1) -> None:
        self._pids = pids
        self._interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def _sample(self) -> None:
        self.peak = max(self.peak, sum(rss_bytes(pid) for pid in self._pids()))

    def _run(self) -> None:
        while not self._done.wait(self._interval):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._done.set()
        self._thread.join()
        self._sample()


class Server:
    """A server started as a child process, its log in a file, stopped by ``stop``."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 -- open for the server's life
        # Its own session: a Ctrl-C on the bench reaches the bench alone, which then
        # stops every server itself (SIGTERM, in order).
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=env, start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        """The server's process and its descendants (a gateway's workers)."""
        return tree(self.pid) if self.process.poll() is None else []

    def wait_ready(self, probe: Callable[[], bool], timeout: float) -> None:
        """Block until ``probe()`` is true; raise if the server exits or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}: {self.log_tail()}")
            if probe():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready within {timeout:g}s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def log_size(self) -> int:
        """How many bytes the server has logged so far: a mark for ``log_since``."""
        return self.log_path.stat().st_size

    def log_since(self, mark: int, *, first: int, last: int) -> list[str]:
        """The lines logged since ``mark``: the ``first`` ones and the ``last`` ones, with
        a line between that says how many were left out."""
        with open(self.log_path, "rb") as log:
            log.seek(mark)
            lines = log.read().decode(errors="replace").splitlines()
        if len(lines) <= first + last:
            return lines
        return [*lines[:first], f"... {len(lines) - first - last} lines left out ...", *lines[-last:]]

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL the whole session. Returns the status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.process.wait()
        # Anything it left in its session (a worker whose parent was killed) goes too.
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.process.returncode
