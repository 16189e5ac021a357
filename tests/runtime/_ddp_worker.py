"""torchrun entry for tests/runtime/test_distributed.py: runs `python -m pipeline.train <args>` with two test hooks.

DDP_TEST_FORBID=<dir>: on ranks > 0 an audit hook raises on any write under <dir> (opening a file for
  writing, rename/replace, remove, creating a directory that does not exist yet), so the run fails if a
  rank other than 0 writes into the run dir.
DDP_TEST_SIGTERM_AT=<k>: rank 1 (only) sends itself SIGTERM after its k-th optimizer step.
"""
import os
import runpy
import signal
import sys

RANK = int(os.environ.get("RANK", "0"))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _under(path, root: str) -> bool:
    if isinstance(path, bytes):
        path = path.decode()
    if not isinstance(path, (str, os.PathLike)):
        return False
    real = os.path.realpath(os.fspath(path))
    return real == root or real.startswith(root + os.sep)


def _forbid_writes(root: str) -> None:
    root = os.path.realpath(root)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args[2] is not None and args[2] & _WRITE_FLAGS:
            paths = [args[0]]
        elif event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+"):
            paths = [args[0]]
        elif event in ("os.rename", "os.remove", "os.rmdir", "os.truncate"):
            paths = [args[0]] + ([args[1]] if event == "os.rename" else [])
        elif event == "os.mkdir" and not os.path.isdir(os.fspath(args[0])):
            paths = [args[0]]
        else:
            return
        bad = [p for p in paths if _under(p, root)]
        if bad:
            raise RuntimeError(f"rank {RANK} wrote under {root}: {event} {bad[0]}")
    sys.addaudithook(hook)


def _sigterm_after(k: int) -> None:
    from pipeline.training import loop
    step, count = loop._step, {"n": 0}

    def counted(*args, **kwargs):
        out = step(*args, **kwargs)
        count["n"] += 1
        if count["n"] == k:
            os.kill(os.getpid(), signal.SIGTERM)
        return out
    loop._step = counted


def rewrap_worker(rank: int, port: int, out: str) -> None:
    """torch.multiprocessing.spawn target of test_thawed_params_are_synced_after_rewrap (light imports)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import torch

    from pipeline.runtime import distributed
    distributed.init_from_env()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[0].requires_grad_(False)
    ddp = distributed.wrap_ddp(model, torch.device("cpu"))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(rank))  # different data per rank
    ddp(x).sum().backward()
    model[0].requires_grad_(True)  # a gradual thaw
    same = distributed.wrap_ddp(model, torch.device("cpu"), current=ddp)
    rewrapped = same is not ddp
    del ddp  # as in fit(), where the wrapper in use is replaced
    model.zero_grad()
    same(x).sum().backward()
    grads = distributed.all_gather_object(model[0].weight.grad.clone())
    if rank == 0:
        torch.save({"rewrapped": rewrapped, "diff": float((grads[0] - grads[1]).abs().max()),
                    "norm": float(grads[0].abs().max())}, out)
    distributed.barrier()  # neither rank leaves the group while the other still talks to it
    distributed.teardown()
    # The result is on disk and the group is left. Skip interpreter finalization: the DDP reducer keeps the
    # gloo group alive until then, and gloo threads racing finalization aborted rank 1 twice in ~130
    # runs ("terminate called without an active exception", cf. pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    if os.environ.get("DDP_TEST_FORBID") and RANK > 0:
        _forbid_writes(os.environ["DDP_TEST_FORBID"])
    if os.environ.get("DDP_TEST_SIGTERM_AT") and RANK == 1:
        _sigterm_after(int(os.environ["DDP_TEST_SIGTERM_AT"]))
    sys.argv = ["pipeline.train", *sys.argv[1:]]
    runpy.run_module("pipeline.train", run_name="__main__", alter_sys=True)
