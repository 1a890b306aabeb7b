"""What Linux's /proc says about a process: its children, command line, state and CPU time.

The one reader of /proc/PID/cmdline, /proc/PID/stat and the children lists:
the launcher finds its Python-backend stubs here, the supervisor judges them
by their state, and the tests and benchmarks find the process to kill. A
process that ends while it is read simply yields nothing (an empty list,
None, 0.0): processes come and go between two reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional


def child_processes(pid: int) -> List[int]:
    """The child processes of `pid` (of every one of its threads)."""
    found: List[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            found += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def descendants(pid: int) -> List[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    found: List[int] = []
    queue = [pid]
    while queue:
        children = child_processes(queue.pop())
        found += children
        queue += children
    return found


def command_line(pid: int) -> List[str]:
    """The arguments `pid` runs with, its program first; [] when the process is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def running(pids: List[int], fragment: str) -> List[int]:
    """Those of `pids` whose command line, its arguments joined by spaces, holds `fragment`."""
    return [pid for pid in pids if fragment in " ".join(command_line(pid))]


def _stat_fields(pid: int) -> Optional[List[str]]:
    """/proc/PID/stat after the command name (field 3, the state, first); None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def process_state(pid: int) -> Optional[str]:
    """R, S, D, T (stopped), t (traced), Z (zombie), ...; None when the process is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def group_members(pgid: int) -> List[int]:
    """The live processes (zombies aside) of process group `pgid`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields and fields[0] != "Z" and int(fields[2]) == pgid:  # state, ppid, pgrp
                found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """User and system CPU time `pid` has used; 0.0 when the process is gone."""
    fields = _stat_fields(pid)
    if not fields:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
