"""Device selection, mixed precision and memory-format options (GPU parts skip without CUDA)."""
from __future__ import annotations

import pytest
import timm
import torch

from pipeline.errors import ConfigError
from pipeline.runtime.devices import Accel, build_accel, prepare_model, resolve_amp, select_device
from pipeline.training import loop

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_device_selection_follows_availability(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto").type == "cpu" and select_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="trainer.device=cuda but no CUDA device"):
        select_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto").type == "cuda"


def test_amp_resolution_per_device(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_amp("auto", cpu) is None and resolve_amp("off", gpu) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_amp("auto", gpu) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_amp("auto", gpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_amp("fp16", cpu)


def _epoch(accel: Accel, model):
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 3, (16,))
    loader = [(x[:8], y[:8]), (x[8:], y[8:])]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    stats = loop.train_one_epoch(model, loader, loop.TrainStep(torch.nn.CrossEntropyLoss(), opt, sched, accel))
    logits, _ = loop.predict_logits(model, loader, accel.device, accel=accel)
    return stats, logits


def test_channels_last_gives_the_same_training_step_and_bf16_runs_on_cpu():
    torch.manual_seed(1)
    base = timm.create_model("test_efficientnet", num_classes=3)
    nhwc = timm.create_model("test_efficientnet", num_classes=3)
    init = {k: v.clone() for k, v in base.state_dict().items()}
    nhwc.load_state_dict(init)
    accel = build_accel(torch.device("cpu"), amp="off", channels_last=True)
    prepare_model(nhwc, accel)
    assert nhwc.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    s1, l1 = _epoch(Accel(torch.device("cpu")), base)
    s2, l2 = _epoch(accel, nhwc)
    assert abs(s1["train_loss"] - s2["train_loss"]) < 1e-4 and torch.allclose(torch.from_numpy(l1), torch.from_numpy(l2), rtol=1e-3,
                                                                             atol=1e-3)
    bf16 = timm.create_model("test_efficientnet", num_classes=3)
    bf16.load_state_dict(init)
    s3, l3 = _epoch(build_accel(torch.device("cpu"), amp="bf16"), bf16)
    assert l3.dtype == l1.dtype and abs(s3["train_loss"] - s1["train_loss"]) < 0.05  # bf16: close, not equal


def test_compile_keeps_state_dict_keys():
    model = timm.create_model("test_efficientnet", num_classes=3)
    keys = list(model.state_dict())
    prepare_model(model, Accel(torch.device("cpu")), compile_model=True)
    assert list(model.state_dict()) == keys  # checkpoints stay loadable without compile


@cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_epoch_with_amp(amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    accel = build_accel(torch.device("cuda"), amp=amp)
    assert (accel.scaler is not None) == (amp == "fp16")
    model = timm.create_model("test_efficientnet", num_classes=3).cuda()
    stats, logits = _epoch(accel, model)
    assert stats["train_images"] == 16 and logits.shape == (16, 3)
