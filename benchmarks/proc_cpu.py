"""CPU seconds used by the processes of a local fleet, read from Linux ``/proc`` (benchmarks only).

``CpuMeter(groups)`` names processes (``{"worker-0": pid, "router": pid}``);
every other process under ``root`` (this process's children: Ray's raylet and
GCS, Ray's idle worker processes and agents, redis-server) falls into the
group named by its command (``raylet``, ``gcs_server``, ``redis-server``) or
``"ray other"``. ``snapshot()`` returns cumulative CPU seconds per group;
``used(before, after)`` the difference. A process that ended between two
snapshots stops counting (its last seconds are lost; none of the named ones
ends during a measurement).
"""

from __future__ import annotations

import os
from collections import defaultdict

__all__ = ["CpuMeter", "cpu_seconds", "descendants", "machine_cpu"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(command, parent pid, user + system CPU seconds) of ``pid``; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    head, tail = text.rsplit(")", 1)
    comm = head.split("(", 1)[1]
    fields = tail.split()
    return comm, int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK


def machine_cpu() -> dict[str, float]:
    """The whole machine's CPU seconds so far (``/proc/stat``): normal priority (user + system), niced, interrupts."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v[:8]
    return {"normal": (user + system) / _TICK, "niced": nice / _TICK, "interrupts": (irq + softirq) / _TICK,
            "steal": steal / _TICK}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (0.0 if it is gone)."""
    s = _stat(pid)
    return 0.0 if s is None else s[2]


def descendants(root: int) -> dict[int, tuple[str, float]]:
    """Every process under ``root`` (``root`` included): pid -> (command, CPU seconds)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            s = _stat(int(name))
            if s is not None:
                stats[int(name)] = s
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (_, ppid, _) in stats.items():
        children[ppid].append(pid)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in out:
            out[pid] = (stats[pid][0], stats[pid][2])
            todo.extend(children.get(pid, ()))
    return out


class CpuMeter:
    """CPU seconds per named group of the process tree under ``root`` (default: this process)."""

    KNOWN = ("raylet", "gcs_server", "redis-server")

    def __init__(self, groups: dict[str, int], root: int | None = None):
        self.groups = dict(groups)
        self.root = os.getpid() if root is None else root

    def snapshot(self) -> dict:
        """pid -> (group, cumulative CPU seconds) for every process of the tree and every named one; under the key
        ``"machine"`` the whole machine's ``machine_cpu()``."""
        by_pid = {pid: name for name, pid in self.groups.items()}
        out: dict = {"machine": machine_cpu()}
        for pid, (comm, cpu) in descendants(self.root).items():
            out[pid] = (by_pid.get(pid) or next((k for k in self.KNOWN if comm.startswith(k)), "ray other"), cpu)
        for name, pid in self.groups.items():  # a named process outside the tree
            if pid not in out and _stat(pid) is not None:
                out[pid] = (name, cpu_seconds(pid))
        return out

    def used(self, before: dict, after: dict) -> dict[str, float]:
        """CPU seconds per group between two snapshots (processes started in between: all of theirs)."""
        out = {name: 0.0 for name in self.groups}
        for pid, entry in after.items():
            if pid != "machine":
                name, cpu = entry
                out[name] = out.get(name, 0.0) + cpu - (before[pid][1] if pid in before else 0.0)
        return out

    @staticmethod
    def others(before: dict, after: dict, ours: dict[str, float]) -> dict[str, float]:
        """The rest of the machine between two snapshots: ``other`` (CPU not of our processes), ``niced`` (of
        every niced thread, ours included), ``interrupts`` and ``steal`` CPU seconds."""
        m = {k: after["machine"][k] - before["machine"][k] for k in after["machine"]}
        return {"other": max(0.0, m["normal"] + m["niced"] - sum(ours.values())), "niced": m["niced"],
                "interrupts": m["interrupts"], "steal": m["steal"]}
