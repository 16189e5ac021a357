"""How much memory this process may still take: the smallest of the limits that apply, shared among the local ranks.

The limits read (each optional; a missing or unreadable one is no limit):
- `MemAvailable` of /proc/meminfo: the host's free + reclaimable memory (free pages where there is no /proc);
- the cgroup of this process and its ancestors (containers, systemd, Slurm's task/cgroup): v2 `memory.max` minus
  what is in use (`memory.current` less the reclaimable `inactive_file` of `memory.stat`), v1
  `memory.limit_in_bytes` minus `memory.usage_in_bytes` (less `total_inactive_file`); `max` = no limit;
- the Slurm job's allocation on this node: `SLURM_MEM_PER_NODE` (MB), or `SLURM_MEM_PER_CPU` (MB) times
  `SLURM_CPUS_ON_NODE`, for when Slurm does not enforce it through a cgroup this process can see.
The smallest is divided among the ranks on the node (`LOCAL_WORLD_SIZE`, as torchrun sets it: every rank holds
its own copy of what it caches). `memory_budget` takes the paths and the environment, so tests pass fake ones.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMINFO = Path("/proc/meminfo")
PROC_CGROUP = Path("/proc/self/cgroup")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


@dataclass(frozen=True)
class MemoryBudget:
    """`per_rank` bytes for this process: min(`limits`) / `ranks`; `binding` names the smallest limit."""
    per_rank: int
    limits: dict[str, int]
    binding: str
    ranks: int

    def describe(self) -> str:
        shown = ", ".join(f"{name} {value / 2**20:.0f} MB" for name, value in self.limits.items())
        return (f"{self.per_rank / 2**20:.0f} MB per rank, bound by {self.binding} ({shown}"
                + (f"; shared by {self.ranks} local ranks)" if self.ranks > 1 else ")"))


def _read_int(path: Path) -> int | None:
    """The integer in `path`; None for `max`, a missing or unreadable file, or v1's "no limit" number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text.isdigit():
        return None  # "max" (v2: no limit) or garbage
    value = int(text)
    return None if value >= _NO_LIMIT else value


def _stat_value(path: Path, key: str) -> int:
    """One `key value` line of a cgroup memory.stat (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def meminfo_available(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable in bytes (the host's sysconf free pages when there is no meminfo, None when neither is)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _own_cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """This process's cgroup dirs (v2 unified and v1 memory), innermost first, up to and including `root`."""
    starts = [root, root / "memory"]
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            base = root if controllers == "" else root / "memory" if "memory" in controllers.split(",") else None
            if base is not None and rel.strip("/"):
                starts.insert(0, base / rel.strip("/"))
    except (OSError, ValueError):
        pass  # no /proc: only the mount point itself (a container's own cgroup)
    dirs: list[Path] = []
    for start in starts:
        top = root / "memory" if start.is_relative_to(root / "memory") else root
        node = start
        while node.is_relative_to(top):
            if node.is_dir() and node not in dirs:
                dirs.append(node)
            if node == top:
                break
            node = node.parent
    return dirs


def cgroup_available(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int | None:
    """Bytes left under the tightest memory limit of this process's cgroups (v2 or v1); None when unlimited."""
    left = []
    for d in _own_cgroup_dirs(root, proc_cgroup):
        if (d / "memory.max").exists():  # v2
            limit, used = _read_int(d / "memory.max"), _read_int(d / "memory.current")
            reclaimable = _stat_value(d / "memory.stat", "inactive_file")
        else:  # v1
            limit, used = _read_int(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
            reclaimable = _stat_value(d / "memory.stat", "total_inactive_file")
        if limit is not None:
            left.append(max(0, limit - max(0, (used or 0) - reclaimable)))
    return min(left) if left else None


def slurm_limit(env: Mapping[str, str]) -> int | None:
    """The Slurm job's memory on this node in bytes (SLURM_MEM_PER_NODE, or per CPU x CPUs); None outside Slurm."""
    def number(key: str) -> int | None:
        value = env.get(key, "").strip()
        return int(value) if value.isdigit() else None

    per_node = number("SLURM_MEM_PER_NODE")
    if per_node:  # 0 means "all the node's memory": no limit of its own
        return per_node << 20
    per_cpu, cpus = number("SLURM_MEM_PER_CPU"), number("SLURM_CPUS_ON_NODE")
    return per_cpu * cpus << 20 if per_cpu and cpus else None


def memory_budget(*, meminfo: Path = MEMINFO, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP,
                  env: Mapping[str, str] | None = None) -> MemoryBudget:
    """The smallest of the limits (module doc) divided among the local ranks."""
    env = os.environ if env is None else env
    found = {"MemAvailable": meminfo_available(meminfo), "cgroup memory limit": cgroup_available(cgroup_root,
             proc_cgroup), "Slurm job memory": slurm_limit(env)}
    limits = {name: value for name, value in found.items() if value is not None}
    local = env.get("LOCAL_WORLD_SIZE", "1").strip()  # what distributed.local_world_size() reads
    ranks = max(1, int(local)) if local.isdigit() else 1
    if not limits:
        return MemoryBudget(0, {}, "nothing readable (no /proc/meminfo, cgroup or Slurm limit)", ranks)
    binding = min(limits, key=limits.__getitem__)
    return MemoryBudget(limits[binding] // ranks, limits, binding, ranks)
