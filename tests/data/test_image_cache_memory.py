"""The image cache's memory budget (runtime/memory.py): host MemAvailable, cgroup v1/v2 and Slurm limits, shared
among the local ranks; `dataset.cache=auto` decides on it and logs the binding limit. Fake /proc and cgroup
files under tmp_path, fake environments."""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest

from pipeline.data import image_cache
from pipeline.runtime import memory

GiB, MiB = 1 << 30, 1 << 20


def fake_host(tmp_path: Path, available: int = 8 * GiB, proc_cgroup: str = "0::/\n") -> dict:
    """Paths for `memory_budget`: a meminfo with MemAvailable, an empty cgroup root, a /proc/self/cgroup."""
    (tmp_path / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {available // 1024} kB\n")
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "self_cgroup").write_text(proc_cgroup)
    return {"meminfo": tmp_path / "meminfo", "cgroup_root": tmp_path / "cgroup", "proc_cgroup": tmp_path / "self_cgroup"}


def write_files(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def test_host_memory_alone_when_no_cgroup_or_slurm_limit(tmp_path):
    host = fake_host(tmp_path)
    write_files(host["cgroup_root"], memory_max="max\n", memory_current=str(5 * GiB))  # v2, unlimited
    budget = memory.memory_budget(**host, env={})
    assert (budget.per_rank, budget.binding, budget.ranks) == (8 * GiB, "MemAvailable", 1)


def test_cgroup_v2_limit_minus_its_working_set_binds(tmp_path):
    host = fake_host(tmp_path)
    write_files(host["cgroup_root"], memory_max=str(4 * GiB), memory_current=str(3 * GiB),
                memory_stat=f"anon 1\ninactive_file {GiB}\nactive_file 5\n")
    budget = memory.memory_budget(**host, env={})
    assert budget.per_rank == 2 * GiB  # 4 GiB limit - (3 GiB in use - 1 GiB reclaimable page cache)
    assert budget.binding == "cgroup memory limit" and budget.limits["MemAvailable"] == 8 * GiB
    assert "bound by cgroup memory limit" in budget.describe()


def test_cgroup_v2_tightest_ancestor_of_the_own_cgroup_binds(tmp_path):
    host = fake_host(tmp_path, proc_cgroup="0::/job_7/step_0\n")
    write_files(host["cgroup_root"] / "job_7", memory_max=str(3 * GiB), memory_current=str(GiB))
    write_files(host["cgroup_root"] / "job_7" / "step_0", memory_max="max", memory_current=str(GiB))
    assert memory.memory_budget(**host, env={}).per_rank == 2 * GiB


def test_cgroup_v1_limit_binds_and_its_no_limit_number_is_ignored(tmp_path):
    host = fake_host(tmp_path, proc_cgroup="4:memory:/slurm/job_1\n3:cpu:/\n0::/\n")
    write_files(host["cgroup_root"] / "memory", memory_limit_in_bytes="9223372036854771712",  # v1's "no limit"
                memory_usage_in_bytes=str(10 * GiB))
    write_files(host["cgroup_root"] / "memory" / "slurm" / "job_1", memory_limit_in_bytes=str(6 * GiB),
                memory_usage_in_bytes=str(2 * GiB), memory_stat=f"total_inactive_file {GiB}\n")
    budget = memory.memory_budget(**host, env={})
    assert (budget.per_rank, budget.binding) == (5 * GiB, "cgroup memory limit")


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_MEM_PER_NODE": "3072"}, 3 * GiB),
    ({"SLURM_MEM_PER_CPU": "512", "SLURM_CPUS_ON_NODE": "4"}, 2 * GiB),
    ({"SLURM_MEM_PER_NODE": "0"}, 8 * GiB),  # 0 = the whole node: no limit of its own
    ({"SLURM_MEM_PER_CPU": "512"}, 8 * GiB),  # CPU count unknown: not a limit
])
def test_slurm_job_limit(tmp_path, env, expected):
    budget = memory.memory_budget(**fake_host(tmp_path), env=env)
    assert budget.per_rank == expected
    assert budget.binding == ("Slurm job memory" if expected < 8 * GiB else "MemAvailable")


def test_budget_is_shared_among_the_local_ranks(tmp_path):
    budget = memory.memory_budget(**fake_host(tmp_path), env={"LOCAL_WORLD_SIZE": "4", "SLURM_MEM_PER_NODE": "4096"})
    assert (budget.per_rank, budget.ranks, budget.binding) == (GiB, 4, "Slurm job memory")
    assert "shared by 4 local ranks" in budget.describe()


def test_cache_auto_decides_on_the_per_rank_cgroup_budget_and_logs_the_binding_limit(tiny_folder, tmp_path,
                                                                                     monkeypatch, caplog):
    paths = sorted(str(p) for p in tiny_folder.rglob("*.png"))  # 48 images of 40x40: 230 KB decoded
    (tmp_path / "host").mkdir()
    host = fake_host(tmp_path / "host")
    write_files(host["cgroup_root"], memory_max=str(4 * MiB), memory_current=str(2 * MiB))  # 2 MiB left
    fake = functools.partial(memory.memory_budget, **host)
    monkeypatch.setattr(memory, "memory_budget", lambda: fake(env={}))
    caplog.set_level(logging.INFO, logger="pipeline.data.image_cache")
    assert image_cache.resolve_auto(paths, 54, repeated=True, ram_fraction=0.25) == "memory"  # 230 KB <= 512 KB
    assert "bound by cgroup memory limit" in caplog.text
    monkeypatch.setattr(memory, "memory_budget", lambda: fake(env={"LOCAL_WORLD_SIZE": "8"}))
    assert image_cache.resolve_auto(paths, 54, repeated=True, ram_fraction=0.25) == "none"  # 64 KB per rank
