"""Eval preprocessing on the accelerator (`dataset.decode=gpu`): JPEG decode, resize, crop and normalise on the
device, so the CPU only reads file bytes. On a GPU the CPU-side decode and PIL resize, not the model, set the
speed of extraction and evaluation.

The steps are timm's eval transform (data/augment.py `build_eval_transform`): short side to
floor(size / crop_pct) (torchvision's rounding, `images.resized_shape`), torchvision's center crop, optional grey
replication, mean/std. JPEGs decode with `torchvision.io.decode_jpeg(device=...)`; any other format, and a JPEG
the device decoder refuses, goes through the CPU path (`images.decode_rgb`), so every file the CPU path reads is
read. The CPU path's bounds hold here too, checked before the device decodes: file size (`images.read_bytes`),
then the header's pixel count and aspect ratio (`images.check_header`), then the resize target
(`images.resize_target`). The resize is torch's antialiased interpolation, not PIL's: pixels differ slightly
from the CPU path (`PARITY_TOLERANCE`, checked by tests/data/test_device_decode.py with the CPU decoder; not yet
measured on a GPU, which is why `dataset.decode` defaults to cpu).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
import torchvision

from pipeline.data.augment import eval_resize_size
from pipeline.data.folder import Split, record_skip
from pipeline.data.images import ImageDecodeError, check_header, decode_rgb, read_bytes, resize_target

# max abs difference of a normalised pixel against the CPU path (PIL bicubic vs torch antialiased bicubic, and
# libjpeg-turbo vs nvJPEG on a GPU): see tests/data/test_device_decode.py
PARITY_TOLERANCE = 0.25
MEAN_TOLERANCE = 0.01  # mean abs difference (measured on CPU, hymenoptera val: max 0.10, mean 0.0014)
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "area": "area", "lanczos": "bicubic"}


def resolve_decode(setting: str, device: torch.device) -> str:
    """`dataset.decode`: `auto` is `gpu` on CUDA and `cpu` elsewhere (checked at start-up: `gpu` needs CUDA)."""
    if setting == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    return setting


def _decode(data: bytes, path: str, device: torch.device, max_pixels: int) -> torch.Tensor:
    """(3, H, W) uint8 on `device`: the device JPEG decoder, else the CPU path (other formats, refused files).
    The header is checked first: a file over a bound (`images.size_problem`) raises before any decode."""
    check_header(data, path, max_pixels)
    if data[:3] == b"\xff\xd8\xff":
        try:
            image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                               mode=torchvision.io.ImageReadMode.RGB, device=device)
            if image.shape[1] * image.shape[2] <= max_pixels:
                return image
        except RuntimeError:
            pass  # e.g. CMYK or progressive JPEGs some decoders refuse: the CPU path handles every format
    rgb = decode_rgb(data, path, max_pixels)  # raises ImageDecodeError for a file that is not an image
    return torch.from_numpy(rgb).permute(2, 0, 1).to(device)


def preprocess(image: torch.Tensor, data_cfg: dict) -> torch.Tensor:
    """uint8 (3, H, W) on any device -> the normalised (3, S, S) float eval input. Raises ImageDecodeError for a
    resize it will not allocate (`images.resize_target`)."""
    size, short = int(data_cfg["input_size"][-1]), eval_resize_size(data_cfg)
    h, w = image.shape[1:]
    new_h, new_w = resize_target(h, w, short)  # checked before the float copy
    x = image.float().unsqueeze(0)
    if min(h, w) != short:
        mode = _MODES.get(data_cfg.get("interpolation", "bilinear"), "bilinear")
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, antialias=mode in ("bicubic", "bilinear"),
                          align_corners=False if mode in ("bicubic", "bilinear") else None).clamp_(0, 255)
        x = x.round_()  # the CPU path resizes 8-bit images
    _, _, h, w = x.shape
    if h < size or w < size:  # torchvision's center crop pads with zeros
        ph, pw = max(size - h, 0), max(size - w, 0)
        x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
        h, w = x.shape[2:]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
    if data_cfg.get("grayscale_input"):  # ITU-R 601 luma, as albumentations' ToGray
        weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
        x = (x * weights).sum(1, keepdim=True).round_().expand(-1, 3, -1, -1)
    mean = torch.tensor(data_cfg["mean"], device=x.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(data_cfg["std"], device=x.device).view(1, 3, 1, 1) * 255.0
    return ((x - mean) / std)[0]


class DeviceBatches:
    """Eval batches `(images on device, labels)` of `split`, preprocessed on `device`; with `indices`, of those
    images only, each batch then `(images, labels, their split indices)`. An undecodable file is skipped with a
    warning, as the CPU loader's collate does."""

    def __init__(self, split: Split, data_cfg: dict, device: torch.device, batch_size: int, *,
                 max_pixels: int, indices: list[int] | None = None, skip_log=None):
        self.split, self.data_cfg, self.device, self.batch_size = split, data_cfg, device, batch_size
        self.max_pixels, self.with_index, self.skip_log = max_pixels, indices is not None, skip_log
        self.dataset = split  # as a DataLoader's: len(loader.dataset) is the number of images
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[tuple]:
        for start in range(0, len(self.indices), self.batch_size):
            images, labels, kept = [], [], []
            for i in self.indices[start:start + self.batch_size]:
                path = self.split.paths[i]
                try:
                    images.append(preprocess(_decode(read_bytes(path), path, self.device, self.max_pixels),
                                             self.data_cfg))
                except ImageDecodeError as e:
                    record_skip(self.skip_log, path, e.reason)
                    continue
                labels.append(self.split.labels[i])
                kept.append(i)
            if not images:
                yield None
                continue
            batch = (torch.stack(images), torch.tensor(labels))
            yield (*batch, torch.tensor(kept)) if self.with_index else batch
