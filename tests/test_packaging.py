"""Installed, not cloned: a wheel built from this checkout, installed into a fresh virtualenv and run
from a folder outside the repository, has its built-in recipes. Nothing is downloaded: the wheel is
built without isolation and installed without dependencies; the new venv borrows the test venv's
packages (torch, transformers, ...) through a .pth line, so only minibt itself comes from the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "minibt"]  # what a build reads


def _run(args: list, cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the checkout (the build writes build/ and *.egg-info where it runs)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES[:-1]:
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "minibt", src / "minibt", ignore=shutil.ignore_patterns("__pycache__"))
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", tmp / "dist", src], tmp)
    assert "eprecat" not in built.stdout + built.stderr, "the build warns of a deprecation"
    (path,) = (tmp / "dist").glob("minibt-*.whl")
    return path


def test_the_wheel_holds_the_recipes_and_the_license(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {f"minibt/recipes/{r}.yaml" for r in ("toy", "colab-t4", "cpu-135m", "gpu-24gb", "paper")} <= set(names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in metadata.splitlines()


def test_an_installed_wheel_runs_the_builtin_recipes_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], tmp_path)
    # after the install, so pip never sees (or touches) the test venv's editable minibt; a plain path line
    # runs no .pth file from there, so the editable install's finder stays out of the new venv
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "borrowed_from_the_test_venv.pth").write_text("\n".join(borrowed) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([python, "-c", "import minibt; print(minibt.__file__)"], work, env=env).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the wheel's minibt, not the checkout's
    minibt = venv / ("Scripts/minibt.exe" if os.name == "nt" else "bin/minibt")

    listed = _run([minibt, "recipes"], work, env=env).stdout
    assert [line.split()[0] for line in listed.splitlines()] == ["colab-t4", "cpu-135m", "gpu-24gb", "paper", "toy"]
    _run([minibt, "recipes", "copy", "toy"], work, env=env)
    assert (work / "toy.yaml").read_text() == (ROOT / "minibt" / "recipes" / "toy.yaml").read_text()
    (work / "toy.yaml").unlink()  # so `run toy` below takes the built-in, not the copy
    dry = _run([minibt, "run", "toy", "--dry-run"], work, env=env).stdout
    assert "run directory: runs/toy" in dry and "stages: prepare -> backward" in dry and "memory estimate" in dry
    assert not (work / "runs").exists()
    bench_default = _run([python, "-c", "from minibt.bench import default_recipe_path; print(default_recipe_path())"],
                         work, env=env).stdout.strip()
    assert Path(bench_default).is_relative_to(venv) and Path(bench_default).name == "toy.yaml"
