"""Packaging: the core install (``pip install .``, no extras) is enough for the core API, and
the sdist's manifest and license metadata point at files that exist.

The core check runs genjo_fast in a subprocess where every import made *by genjo_fast's own
modules* of a third-party package outside ``[project] dependencies`` fails as if that package
were not installed (optional imports such as triton then take their fallback path). Imports
made by the dependencies themselves (torch importing numpy, ...) are left alone.
"""
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement  # a dependency of pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Runs in the subprocess; argv[1] is the JSON list of the core dependencies' module names.
CORE_ONLY = r'''
import importlib.abc, json, sys

allowed = set(json.loads(sys.argv[1])) | set(sys.stdlib_module_names) | {"genjo_fast"}
refused = set()


class CoreOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in allowed:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith("importlib"):
            frame = frame.f_back
        importer = "" if frame is None else frame.f_globals.get("__name__", "")
        if importer.partition(".")[0] == "genjo_fast":
            refused.add(top)
            raise ModuleNotFoundError(f"No module named {name!r} (not a core dependency)",
                                      name=name)
        return None


sys.meta_path.insert(0, CoreOnly())

import tempfile
import torch
import genjo_fast
from genjo_fast.models import load_llada, save_llada
from genjo_fast.testing import random_llada

model = random_llada(40, d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, seed=0)
prompt = torch.randint(0, 39, (2, 5), generator=torch.Generator().manual_seed(0))
with tempfile.TemporaryDirectory() as directory:
    save_llada(model, directory)
    loaded = load_llada(directory, dtype=torch.float32, device="cpu")
assert torch.equal(loaded(prompt).logits, model(prompt).logits)
out = genjo_fast.generate(loaded, prompt, steps=4, gen_length=4, block_length=4, mask_id=39)
assert out.shape == (2, 9)
ll = genjo_fast.get_log_likelihood(loaded, prompt[0], prompt[1], mc_num=2, batch_size=2,
                                   mask_id=39)
assert ll == ll  # not NaN
print(json.dumps(sorted(refused)))
'''


def _module_names(distribution: str):
    """Top-level import names of an installed distribution (``safetensors`` -> safetensors)."""
    names = {module for module, dists in metadata.packages_distributions().items()
             if distribution.lower().replace("-", "_") in
             {d.lower().replace("-", "_") for d in dists}}
    return names or {distribution.replace("-", "_")}


def test_core_api_runs_on_the_core_dependencies_alone():
    names = sorted({module for requirement in PYPROJECT["project"]["dependencies"]
                    for module in _module_names(Requirement(requirement).name)})
    run = subprocess.run([sys.executable, "-c", CORE_ONLY, json.dumps(names)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    refused = json.loads(run.stdout.strip().splitlines()[-1])
    # The guard is effective: genjo_fast's optional triton import was refused, and the core
    # API (save/load, generate, likelihood) still ran.
    assert "triton" in refused


def _manifest_matches(line: str):
    command, *args = line.split()
    if command == "include":
        return [p for pattern in args for p in ROOT.glob(pattern)]
    if command == "recursive-include":
        folder, *patterns = args
        return {pattern: list((ROOT / folder).rglob(pattern)) for pattern in patterns}
    if command == "graft":
        return [p for p in (ROOT / args[0]).rglob("*") if p.is_file()]
    raise AssertionError(f"MANIFEST.in command {command!r} not understood by this test")


def test_every_manifest_pattern_matches_a_file():
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        matches = _manifest_matches(line)
        per_pattern = matches if isinstance(matches, dict) else {line: matches}
        for pattern, files in per_pattern.items():
            assert files, f"MANIFEST.in: {line!r}: {pattern!r} matches no file"


def test_license_metadata_names_existing_files():
    project = PYPROJECT["project"]
    assert isinstance(project["license"], str)  # an SPDX expression, not a table
    for pattern in project["license-files"]:
        files = list(ROOT.glob(pattern))
        assert files, f"license-files: {pattern!r} matches no file"
        if project["license"] == "Apache-2.0":
            assert any("Apache License" in f.read_text() and "Version 2.0" in f.read_text()
                       for f in files)
