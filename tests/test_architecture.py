"""The layering is code: the import-linter contracts in pyproject.toml hold, and an import that breaks them fails
`make lint` (and so `make test` and CI). Checked on a temporary copy of the package with one bad import added."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

LINT = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "lint-imports"


def lint(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the package under `root` (its pyproject.toml, its copy of pipeline/ first on the path)."""
    exe = str(LINT) if LINT.is_file() else shutil.which("lint-imports")
    return subprocess.run([exe, "--no-cache"], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})


@pytest.fixture
def copy(tmp_path) -> Path:
    shutil.copytree(ROOT / "pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def add_import(module: Path, line: str) -> None:
    module.write_text(module.read_text() + f"\n{line}  # noqa\n")


def test_the_package_keeps_every_contract(copy):
    proc = lint(copy)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-3000:]


@pytest.mark.parametrize("module, line, broken", [
    ("data/images.py", "import pipeline.train", ["Layers", "Nothing imports an entry point"]),
    ("model/backbone.py", "from pipeline.data import folder", ["The network and the images"]),
    ("ship/loading.py", "import hydra", ["no Hydra, no training code"]),
    ("data/images.py", "from pipeline.data import folder", ["No import cycles"]),
])
def test_a_forbidden_import_fails_lint(copy, module, line, broken):
    add_import(copy / "pipeline" / module, line)
    proc = lint(copy)
    assert proc.returncode != 0, proc.stdout[-3000:]
    for name in broken:
        assert any(name in ln and ln.rstrip().endswith("BROKEN") for ln in proc.stdout.splitlines()), \
            (name, proc.stdout[-3000:])


def test_importing_every_module_has_no_side_effects():
    """Side effects (allocator tuning, thread counts, PIL's limit, logging set-up) belong to the entry points."""
    code = """
import importlib, json, logging, os, pkgutil
import PIL.Image, torch
before = (PIL.Image.MAX_IMAGE_PIXELS, torch.get_num_threads(), len(logging.getLogger().handlers))
import pipeline
for m in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
    importlib.import_module(m.name)
from pipeline.runtime import process
after = (PIL.Image.MAX_IMAGE_PIXELS, torch.get_num_threads(), len(logging.getLogger().handlers))
print(json.dumps({"same": before == after, "malloc_env": sorted(k for k in os.environ if k.startswith("MALLOC_")),
                  "allocator_tuned": process._state["applied"]}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"same": True, "malloc_env": [],
                                                                 "allocator_tuned": None}
