"""bench/gpu_check.sh runs anywhere: without CUDA it says so and runs its CPU-safe part (what CI can call)."""
from __future__ import annotations

import subprocess

import pytest
import torch

from conftest import ROOT


@pytest.mark.long
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the full GPU check")
def test_gpu_check_without_cuda_skips_clearly_and_runs_the_cpu_safe_tests():
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("gpu_check: no CUDA, skipped")
    assert lines[-1].startswith("gpu_check: CPU-safe tests:") and " passed" in lines[-1] and "failed" not in lines[-1]
