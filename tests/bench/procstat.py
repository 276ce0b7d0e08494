"""What a process costs, read from /proc: RSS, threads and CPU seconds (utime + stime) of a process or a group,
and a CPU profile of a whole stack (its workers, PostgreSQL, Redis) between two moments, by process kind."""

from __future__ import annotations

import os
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int, pss: bool = False) -> dict:
    """RSS (MiB), threads and CPU seconds of one process, from /proc; zeros when it is gone. ``pss``: its PSS too
    (MiB): shared pages divided among the processes that map them, so that a group's sum counts PostgreSQL's shared
    buffers once, not once per backend as RSS does."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text() if pss else ""
    except OSError:
        return {"rss_mib": 0.0, "pss_mib": 0.0, "threads": 0, "cpu_s": 0.0}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    proportional = dict(line.split(":", 1) for line in rollup.splitlines() if line.startswith("Pss:"))
    return {
        "rss_mib": int(fields.get("VmRSS", "0 kB").split()[0]) / 1024,
        "pss_mib": int(proportional.get("Pss", "0 kB").split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "cpu_s": (int(stat[11]) + int(stat[12])) / CLOCK_TICKS,  # utime + stime
    }


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def with_descendants(pid: int) -> list[int]:
    pids, pending = [], [pid]
    while pending:
        current = pending.pop()
        pids.append(current)
        pending.extend(children(current))
    return pids


def group_status(pids: list[int], pss: bool = False) -> dict:
    each = [proc_status(pid, pss) for pid in pids]
    return {key: sum(status[key] for status in each) for key in ("rss_mib", "pss_mib", "threads", "cpu_s")}


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


class CpuProfile:
    """CPU seconds per process kind, sampled at two moments. ``kinds`` maps a kind to a callable giving its pids
    now; a pid's CPU counts from 0 when it appeared between the samples and is lost when it ended between them
    (the kinds below keep their processes for a run: worker processes, pooled database connections, Redis)."""

    def __init__(self, kinds: dict):
        self.kinds = kinds
        self.start: dict[str, dict[int, float]] | None = None

    def _read(self) -> dict[str, dict[int, float]]:
        return {kind: {pid: proc_status(pid)["cpu_s"] for pid in pids()} for kind, pids in self.kinds.items()}

    def begin(self) -> None:
        self.start = self._read()

    def end(self) -> dict[str, float]:
        """CPU seconds each kind spent since ``begin``."""
        now = self._read()
        return {
            kind: sum(max(0.0, cpu - self.start[kind].get(pid, 0.0)) for pid, cpu in now[kind].items())
            for kind in self.kinds
        }
