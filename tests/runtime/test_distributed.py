"""DDP (torchrun): sharding/gather helpers, re-wrapping after a thaw, and 2-process CPU (gloo) runs that
equal a one-process run, write only from rank 0, and resume after a SIGTERM."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import rewrap_worker

from conftest import write_tiny_folder
from pipeline.data.sampler import BalancedClassSampler, EvalShardSampler, ShardSampler, distributed_sampler
from pipeline.errors import ConfigError
from pipeline.runtime import distributed

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "_ddp_worker.py"
# Trainable: every BN affine param (BN layers in eval mode) + the classifier. Gradients flow through the
# whole network, yet no layer uses batch statistics, so per-rank shards compute what one process does.
EXACT = ["dataset=folder", "backbone=tiny", "trainer=smoke", "trainer.max_train_batches=0", "trainer.epochs=2",
         "trainer.batch_size=12", "augment=none", "strategy=partial", "strategy.freeze_depth=all",
         "strategy.bn=affine", "trainer.keep_last=true", "seed=3"]


@pytest.mark.parametrize("n", [0, 1, 5, 13, 100])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shards_cover_every_sample_once_in_order(n, world):
    shards = [list(EvalShardSampler(n, r, world)) for r in range(world)]
    assert sum(shards, []) == list(range(n))
    assert [len(s) for s in shards] == [len(EvalShardSampler(n, r, world)) for r in range(world)]


def _perm(n, seed):
    return torch.utils.data.RandomSampler(range(n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,world,batch", [(36, 2, 12), (40, 4, 8), (37, 2, 6)])
def test_train_shards_form_the_one_process_global_batches(n, world, batch):
    """Rank batches of batch/world, joined over ranks = the one-process batches of the same seeded order."""
    order = list(_perm(n, 7))
    loaders = [torch.utils.data.DataLoader(range(n), batch_size=batch // world,
                                           sampler=ShardSampler(_perm(n, 7), r, world)) for r in range(world)]
    per_rank = [list(dl) for dl in loaders]
    assert len({len(b) for b in per_rank}) == 1  # every rank takes the same number of steps
    padded = order + order[: (-n) % world]
    for b, rank_batches in enumerate(zip(*per_rank)):
        joined = sorted(int(i) for rb in rank_batches for i in rb)
        assert joined == sorted(padded[b * batch:(b + 1) * batch])


def test_balanced_sampler_shards_partition_each_epoch_and_keep_state():
    labels = [0] * 20 + [1] * 5 + [2] * 11
    ref = BalancedClassSampler(labels, seed=5)
    shards = [ShardSampler(BalancedClassSampler(labels, seed=5), r, 2) for r in range(2)]
    for _ in range(3):  # the generator advances per epoch on every rank alike (no set_epoch needed)
        order = list(ref)
        assert sorted(sum((list(s) for s in shards), [])) == sorted(order)
    state = shards[0].state_dict()
    again = ShardSampler(BalancedClassSampler(labels, seed=99), 0, 2)
    again.load_state_dict(state)
    assert list(again) == list(shards[0])


def test_single_process_helpers_are_no_ops():
    assert not distributed.is_distributed() and distributed.is_main() and distributed.world_size() == 1
    a, b = np.arange(3), np.zeros((3, 2))
    assert distributed.gather_arrays(a, b) == (a, b)
    assert distributed.from_main(lambda: 5) == 5 and distributed.any_true(True) and not distributed.any_true(False)
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(model, torch.device("cpu")) is model
    assert distributed_sampler(10, None, train=False, rank=0, world=1) is None
    assert distributed.local_batch_size(12) == 12


def test_global_batch_must_split_between_processes(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    assert distributed.local_batch_size(32) == 8
    with pytest.raises(ConfigError, match="trainer.batch_size=30 is the global batch.*trainer.batch_size=28"):
        distributed.local_batch_size(30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_thawed_params_are_synced_after_rewrap(tmp_path):
    out = tmp_path / "rewrap.pt"
    torch.multiprocessing.spawn(rewrap_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    assert res["rewrapped"] and res["norm"] > 0 and res["diff"] < 1e-7  # same averaged grads on both ranks


def _torchrun(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 150):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One-process run (in-process) and a 2-process torchrun run of the same config."""
    base = tmp_path_factory.mktemp("ddp")
    data = write_tiny_folder(base / "tiny", val={"blue": 4, "green": 4, "red": 5})
    common = [*EXACT, f"dataset.root={data}", f"backbone.cache_dir={(ROOT / 'data/weights').resolve()}",
              f"data_dir={base / 'data'}"]
    from conftest import compose_cfg
    from pipeline.train import train
    single = train(compose_cfg([*common, f"output_dir={base / 'single'}", "trainer.threads=1"]))
    ddp = _torchrun(common, cwd=base, env={"DDP_TEST_FORBID": str(base)})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    dirs = list((base / "outputs/runs").iterdir())
    return {"base": base, "common": common, "single": Path(single["run_dir"]), "dirs": dirs, "ddp": ddp}


def _final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def test_two_processes_write_one_run_dir_from_rank_0_only(runs):
    assert len(runs["dirs"]) == 1  # ranks agreed on Hydra's ${now:...} run dir
    run = runs["dirs"][0]
    files = {p.name for p in run.iterdir()} - {".hydra", "train.log"}
    assert files == {p.name for p in runs["single"].iterdir()}  # rank 1 never wrote (audit hook in the worker)
    log = (run / "train.log").read_text()
    assert log.count("Done in") == 1 and "DDP wrap" in log and "rank 0 of 2" in log
    assert not (run / ".hydra" / "overrides.yaml").read_text().count("job_logging")  # rank 0's own Hydra files


def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    single, ddp = _final_weights(runs["single"]), _final_weights(runs["dirs"][0])
    diff = max(float((single[k].float() - ddp[k].float()).abs().max()) for k in single)
    moved = max(float((single[k].float() - v.float()).abs().max()) for k, v in _init_weights(runs).items())
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)  # equal, and training did change the weights
    m1 = json.loads((runs["single"] / "metrics.json").read_text())
    m2 = json.loads((runs["dirs"][0] / "metrics.json").read_text())
    assert m2["val"]["num_samples"] == 13 and m1["val"]["balanced_accuracy"] == m2["val"]["balanced_accuracy"]
    for h1, h2 in zip(m1["history"], m2["history"]):  # train loss reduced over ranks, val gathered exactly
        assert h1["train_images"] == h2["train_images"] == 36
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5)
        assert h1["val_loss"] == pytest.approx(h2["val_loss"], abs=1e-5)


def _init_weights(runs) -> dict:
    from pipeline.model.backbone import build_backbone
    torch.manual_seed(3)
    model, _ = build_backbone(name="test_efficientnet", num_classes=3, weights="none")
    return model.state_dict()


@pytest.mark.long
def test_sigterm_on_one_rank_then_resume_equals_the_uninterrupted_run(runs):
    run = runs["base"] / "interrupted"
    args = [*runs["common"], f"output_dir={run}"]
    first = _torchrun(args, cwd=runs["base"], env={"DDP_TEST_SIGTERM_AT": "4"})  # step 1 of epoch 2, rank 1 only
    assert first.returncode != 0 and "Resume with" in first.stderr, first.stderr[-3000:]
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and state["partial"]["steps"] == 1 and len(state["data_rng"]["transform"]) == 2
    second = _torchrun([f"trainer.resume={run}", "trainer.keep_last=true"], cwd=runs["base"], env={"DDP_TEST_FORBID": str(run)})
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, uninterrupted = _final_weights(run), _final_weights(runs["dirs"][0])
    assert max(float((resumed[k].float() - uninterrupted[k].float()).abs().max()) for k in resumed) < 1e-6
