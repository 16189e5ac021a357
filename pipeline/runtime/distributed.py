"""Data-parallel training across processes (torchrun): process group, rank info, collectives, DDP wrapping.

`torchrun --nproc_per_node=N -m pipeline.train ...` starts N processes and sets RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT. Without them every function here is a no-op and the run
is the plain single-process one. Roles:
- rank 0 alone writes files (run dir, checkpoints, caches, logs) and shows progress bars; the others
  compute and receive rank 0's decisions (run dir, resume state, auto decision) by broadcast.
- `trainer.batch_size` is the global batch: each rank loads batch_size / world_size of it, from a shard
  of the one order every rank draws with the same seed (data/sampler.py ShardSampler), so the global
  batches are exactly those of a single-process run.
- val/test predictions are gathered from contiguous, non-padded shards: metrics are exact.
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import ConfigError, PipelineError

_logger = logging.getLogger(__name__)
_state: dict[str, Any] = {}  # "run_dir": rank 0's run dir, received before Hydra started (prepare_launch)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun set it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0


def init_from_env(timeout_minutes: int = 30) -> bool:
    """Join the process group torchrun describes (no-op without WORLD_SIZE > 1 or when joined already).

    Backend: gloo for CPU tensors, nccl for CUDA tensors when a GPU is visible (one device per local
    rank). Ranks other than 0 log errors only. Returns True when running distributed."""
    if env_world_size() > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=timedelta(minutes=timeout_minutes))
        atexit.register(teardown)
    if not is_distributed():
        return False
    if not is_main():
        logging.getLogger().setLevel(logging.ERROR)
    _logger.info("DDP: rank %d of %d (local %d of %d), backend %s", rank(), world_size(), local_rank(),
                 local_world_size(), dist.get_backend())
    return True


def teardown() -> None:
    """Leave the process group (registered at exit by init_from_env)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def prepare_launch(argv: list[str]) -> None:
    """Before Hydra parses `argv` (edited in place) under torchrun: join the group, refuse --multirun, and on
    ranks > 0 wait for rank 0's run dir and run Hydra in it without writing (.hydra/, log file).

    Hydra resolves `${now:...}` in each process, so ranks could otherwise pick different run dirs."""
    if env_world_size() <= 1:
        return
    if any(a in ("-m", "--multirun") for a in argv[1:]):
        print("error: --multirun under torchrun is not supported: run sweeps with a Hydra launcher "
              "(hydra/launcher=slurm) and keep torchrun for single runs", file=sys.stderr)
        sys.exit(2)
    init_from_env()
    if not is_main():
        run_dir = broadcast_object(None)  # matched by rank 0's main_run_dir() inside train()
        _state["run_dir"] = run_dir
        argv += [f"hydra.run.dir='{run_dir}'", "hydra.output_subdir=null", "hydra/job_logging=none",
                 "hydra/hydra_logging=none"]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled; tensors included)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's `obj`, in rank order."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_true(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (one small all-reduce)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_true(flag: bool) -> bool:
    """True on every rank only when `flag` is true on every rank: ranks take (or skip) a step together."""
    return not any_true(not flag)


def from_main(fn: Callable[[], Any]) -> Any:
    """`fn()` run on rank 0 only, its result broadcast to all ranks; an error on rank 0 is raised everywhere."""
    if not is_distributed():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks were told
            error = e
    status = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if status is not None:
        raise PipelineError(f"rank 0 failed: {status}")
    return broadcast_object(result)


@contextmanager
def main_first():
    """Rank 0 runs the block first (downloads, data and weight caches), then the others, which find the files."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def main_run_dir(compute: Callable[[], Path]) -> Path:
    """Rank 0's run dir on every rank: `compute()` (which creates it) runs on rank 0 only."""
    if not is_distributed():
        return compute()
    if is_main():
        path = compute()
        broadcast_object(str(path))
        return path
    received = _state.pop("run_dir", None)  # prepare_launch already took part in this broadcast
    return Path(received if received is not None else broadcast_object(None))


def threads_per_rank(requested: int) -> int:
    """`trainer.threads` when set; under torchrun the cores split between the local ranks (0 = default)."""
    if requested and requested > 0 or local_world_size() <= 1:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_world_size())


def rank_device(device: torch.device) -> torch.device:
    """CUDA: this local rank's GPU; CPU unchanged."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def local_batch_size(global_batch: int) -> int:
    """Per-rank share of `trainer.batch_size` (the global batch); it must split evenly."""
    n = world_size()
    if global_batch % n:
        raise ConfigError(f"trainer.batch_size={global_batch} is the global batch and must be divisible by the "
                          f"{n} processes; use e.g. trainer.batch_size={max(n, global_batch - global_batch % n)}")
    return global_batch // n


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each array concatenated over ranks in rank order (empty shards dropped): with contiguous eval shards
    (sampler.EvalShardSampler) that is the original sample order."""
    if not is_distributed():
        return arrays
    parts = all_gather_object(arrays)
    out = []
    for i in range(len(arrays)):
        pieces = [p[i] for p in parts if len(p[i])]
        out.append(np.concatenate(pieces) if pieces else arrays[i])
    return tuple(out)


def convert_sync_bn(model: torch.nn.Module, enabled: bool, device: torch.device) -> torch.nn.Module:
    """`trainer.sync_bn`: BatchNorm layers become SyncBatchNorm (timm's converter keeps BatchNormAct's
    activation). Call before freezing: frozen BN stays in eval mode and never syncs. GPU only (torch)."""
    if not enabled:
        return model
    if not is_distributed():
        _logger.info("trainer.sync_bn=true has no effect in a single process")
        return model
    if device.type != "cuda":
        raise ConfigError("trainer.sync_bn=true needs CUDA (torch's SyncBatchNorm does not run on CPU); on CPU "
                          "use strategy.bn=frozen or affine (BN in eval mode) or trainer.sync_bn=false")
    from timm.layers import convert_sync_batchnorm
    return convert_sync_batchnorm(model)


def wrap_ddp(model: torch.nn.Module, device: torch.device, current=None):
    """DDP over the trainable parameters of `model` (frozen ones are excluded: DDP syncs requires_grad params).

    Gradual unfreezing changes that set, which DDP fixes at construction: pass the wrapper in use as
    `current` after each thaw and a new one is built when the set changed (re-wrapping rather than
    find_unused_parameters or static_graph, which cannot add params). Every trainable param of a timm
    classifier is used in each forward, so find_unused_parameters stays off. Single process: `model`."""
    if not is_distributed():
        return model
    trainable = tuple(n for n, p in model.named_parameters() if p.requires_grad)
    if current is not None and getattr(current, "pipeline_trainable", None) == trainable:
        return current
    del current  # its reducer (and the autograd hooks on the params) goes with it
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" \
        else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=False)
    wrapped.pipeline_trainable = trainable
    _logger.info("DDP wrap: %d trainable tensors synced across %d ranks", len(trainable), world_size())
    return wrapped


def reduce_train_stats(stats: dict) -> dict:
    """An epoch's train stats over all ranks: mean loss over every image, images and img/s summed."""
    if not is_distributed() or stats.get("interrupted"):
        return stats
    parts = all_gather_object(stats)
    seen = sum(p["train_images"] for p in parts)
    loss = sum(p["train_loss"] * p["train_images"] for p in parts if p["train_images"]) / seen if seen else \
        stats["train_loss"]
    seconds = max(p["train_seconds"] for p in parts)
    return {**stats, "train_loss": loss, "train_images": seen, "train_seconds": seconds,
            "train_img_per_s": seen / max(seconds, 1e-9),
            "nonfinite_steps": max(p["nonfinite_steps"] for p in parts)}


def agreed_stop(stop: Callable[[], bool]) -> Callable[[], bool]:
    """`stop()` agreed across ranks: all leave the epoch loop at the same step once any rank was signalled.

    A rank that got no signal itself takes SIGTERM as the reason (GracefulStop.interrupted needs one)."""
    if not is_distributed():
        return stop

    def check() -> bool:
        flag = any_true(stop())
        if flag and getattr(stop, "signum", 0) is None:
            import signal
            stop.signum = signal.SIGTERM
        return flag
    return check
