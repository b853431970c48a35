"""Is a worker process alive? Asked of the operating system, for workers on this machine.

A worker's heartbeat in the registry says it is alive from anywhere. On the
machine it runs on, the operating system knows better: a process that exists
and is not stopped is alive, however long its last heartbeat is overdue (a
task holding the interpreter, a database lock that kept the heartbeat out).
Rescuers on the same machine ask it before taking a claim over.

Linux only (``/proc``); elsewhere nothing is known and the heartbeat decides.
"""

from __future__ import annotations

import os
from functools import lru_cache


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


@lru_cache(maxsize=1)
def this_node() -> str | None:
    """This machine's boot and pid namespace: processes with the same node share pids."""
    boot = _read("/proc/sys/kernel/random/boot_id")
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}:{namespace}" if boot else None


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process, from ``/proc/<pid>/stat``; None if it is gone."""
    text = _read(f"/proc/{pid}/stat")
    if text is None:
        return None
    # "pid (comm) state ppid ..." where comm may hold spaces and parentheses.
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 20:
        return None
    return fields[0], fields[19]


def process_start(pid: int) -> str | None:
    """When the process started (clock ticks since boot): tells a reused pid apart."""
    stat = _stat(pid)
    return stat[1] if stat else None


def running_here(node: str | None, pid: int | None, start: str | None) -> bool:
    """Is that process on this machine, alive and not stopped (SIGSTOP, traced)?

    False when it is gone, stopped, a zombie, its pid now belongs to another
    process, or it is not on this machine (then only its heartbeat can tell).
    """
    if node is None or pid is None or start is None or node != this_node():
        return False
    stat = _stat(pid)
    if stat is None:
        return False
    state, started = stat
    return started == start and state not in ("T", "t", "Z", "X", "x")


def is_stopped(pid: int) -> bool:
    """Is the process stopped (SIGSTOP) right now?"""
    stat = _stat(pid)
    return stat is not None and stat[0] in ("T", "t")
