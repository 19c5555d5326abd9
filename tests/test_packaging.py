"""A non-editable install (``pip install .``, a wheel): everything the package reads at run time is inside it.

An editable install reads the repo (csrc/ beside manifoldgd_fast/); a wheel has only what setup.py puts in
it. The wheel is built from a copy of the tree with setuptools' own PEP 517 backend (what pip calls),
unpacked into a folder and imported from there in a child process.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:2])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    setuptools = pytest.importorskip("setuptools", reason="building the wheel needs setuptools, pip's build backend")
    if _version(setuptools.__version__) < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} has no bdist_wheel without the wheel package "
                    "(pip install -e '.[dev]' brings it)")
    tree = tmp_path_factory.mktemp("tree")
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), tree / name)
    for name in ("manifoldgd_fast", "csrc"):
        shutil.copytree(os.path.join(ROOT, name), tree / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-c", f"from setuptools import build_meta; "
                           f"print(build_meta.build_wheel({str(out)!r}))"],
                          cwd=tree, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return os.path.join(out, proc.stdout.strip().splitlines()[-1])


def test_wheel_carries_the_cuda_source_class_lists_and_demo_weights(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {"manifoldgd_fast/csrc/sym_eig.cu", "manifoldgd_fast/classlists/imagenet1k.txt",
            "manifoldgd_fast/classlists/idc.txt", "manifoldgd_fast/weights/digits/SHA256SUMS.json",
            "manifoldgd_fast/kernels/manifold_correct.py", "manifoldgd_fast/eval/protocol.py",
            "manifoldgd_fast/demo/train.py"}
    assert want <= names, sorted(want - names)
    shipped = {n for n in names if n.startswith("manifoldgd_fast/weights/digits/") and n.endswith(".safetensors")}
    assert len(shipped) == 2, shipped
    # every source module of the tree is in it (a new subpackage left out of setup.py's list would not be)
    tree = {os.path.relpath(os.path.join(d, f), ROOT).replace(os.sep, "/")
            for d, _, fs in os.walk(os.path.join(ROOT, "manifoldgd_fast")) for f in fs if f.endswith(".py")}
    assert tree <= names, sorted(tree - names)


def test_installed_wheel_finds_its_cuda_source_and_verifies_its_weights(wheel, tmp_path):
    """Unpacked away from the repo, the package finds sym_eig.cu inside itself and its shipped digits
    models pass their SHA-256 check (what `manifoldgd-fast distill` with no flags loads)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import manifoldgd_fast, os; from manifoldgd_fast.kernels import cuda_ext; "
            "from manifoldgd_fast import shipped; print(manifoldgd_fast.__file__); print(cuda_ext.source_path()); "
            "print(shipped.verify_shipped()); print('verified')")
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pkg, src, weights, ok = proc.stdout.strip().splitlines()[-4:]
    assert pkg.startswith(str(site)) and src == str(site / "manifoldgd_fast" / "csrc" / "sym_eig.cu") and ok == "verified"
    assert weights == str(site / "manifoldgd_fast" / "weights" / "digits")
