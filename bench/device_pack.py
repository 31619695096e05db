"""What the real-model GPU bench needs on a GPU machine with torch, transformers, peft and accelerate and no network,
cut into pieces that each fit one device call (64 MiB, the working tree counted in).

    python bench/device_pack.py [--out .device] [--limit-mib 64]   # build the pieces; print what each call carries
    python bench/device_pack.py --check [--out .device]             # the sizes, and the pieces joined back, proved here

The pieces hold the SmolLM2-135M-Instruct GGUF (98 MB, minibt.bench.smollm2) cut in parts, and the wheels the
device image lacks (trl, datasets with its dill and multiprocess, gguf, bitsandbytes kept to its CUDA 13 and CPU
libraries), at the versions this checkout's environment runs, for the image's Python 3.12. Every
`.device/piece-N/` also holds `manifest.json`: the size and sha256 of each part and of the whole file.
bench/device-real.sh takes one piece per device call (`carry: [".device/piece-N"]`), keeps it, and once all are
there joins and checks them and runs the bench. `.device/` is ignored by git, as `carry` requires.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
WHEELS = ("trl", "datasets", "dill", "multiprocess", "gguf", "bitsandbytes")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64")
BNB_KEEP = ("libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so", "libbitsandbytes_cpu.so")  # the image: CUDA 13


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def tree_bytes() -> int:
    """What a device call sends besides its carry: the files git tracks (a fresh clone has no others)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def download_wheels(dest: Path) -> list[Path]:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *[x for p in PLATFORMS for x in ("--platform", p)], "-d", str(dest), *pins]
    subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def trim_bitsandbytes(wheel: Path) -> None:
    """Keep only the native libraries the image can load, and rewrite RECORD to match (pip checks it)."""
    out = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist() if i.filename.endswith(".so") and Path(i.filename).name not in BNB_KEEP}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [line for line in data.decode().splitlines() if line.split(",")[0] not in dropped]
                data = ("\n".join(lines) + "\n").encode()
            dst.writestr(info, data)
    out.replace(wheel)


def build(out: Path, limit_mib: float) -> dict:
    """The GGUF and the wheels, downloaded and trimmed, in pieces that each fit a call beside the working tree."""
    from minibt.bench.smollm2 import gguf_file

    budget = int(limit_mib * MIB) - tree_bytes() - MIB  # a MiB of margin for the transfer's own files
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download_wheels(Path(tmp))
        for w in wheels:
            if w.name.startswith("bitsandbytes-"):
                trim_bitsandbytes(w)
        return pack(out, gguf_file(), wheels, budget)


def pack(out: Path, model: Path, wheels: list[Path], budget: int) -> dict:
    """Pieces of at most `budget` bytes in `out`/piece-N: the wheels whole and first, then `model` cut across the
    room left; each piece with the same manifest.json."""
    if out.exists():
        shutil.rmtree(out)
    pieces: list[list[tuple[str, Path, int, int]]] = [[]]  # per piece: (name, source, offset, length)
    room = budget
    for w in wheels:
        if w.stat().st_size > room:
            pieces.append([])
            room = budget
        pieces[-1].append((f"wheels/{w.name}", w, 0, w.stat().st_size))
        room -= w.stat().st_size
    offset, size, part = 0, model.stat().st_size, 0
    while offset < size:
        if room <= budget // 16:  # too little room left for a useful part: the next piece
            pieces.append([])
            room = budget
        n = min(room, size - offset)
        pieces[-1].append((f"model.part{part}", model, offset, n))
        offset, room, part = offset + n, room - n, part + 1
    manifest: dict = {"model": {"name": model.name, "bytes": size, "sha256": sha256(model), "parts": part},
                      "pieces": len(pieces), "budget_bytes": budget, "files": {}}
    for i, files in enumerate(pieces, 1):
        for name, source, start, length in files:
            target = out / f"piece-{i}" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with source.open("rb") as f, target.open("wb") as g:
                f.seek(start)
                g.write(f.read(length))
            manifest["files"][name] = {"piece": i, "bytes": length, "sha256": sha256(target)}
    for i in range(1, len(pieces) + 1):
        (out / f"piece-{i}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def located(folders: list[Path]) -> tuple[dict, dict[str, Path | None]]:
    """The manifest, and where in `folders` each file it lists is (None: not carried yet)."""
    manifest = json.loads((folders[0] / "manifest.json").read_text())
    return manifest, {name: next((f / name for f in folders if (f / name).is_file()), None) for name in manifest["files"]}


def join(folders: list[Path], dest: Path) -> Path:
    """The model file from its parts in `folders` (pieces, or where device-real.sh keeps them), checked."""
    manifest, files = located(folders)
    missing = sorted(name for name, path in files.items() if path is None)
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: carry every piece of {manifest['pieces']} first")
    for name, path in files.items():
        assert path is not None
        if sha256(path) != manifest["files"][name]["sha256"]:
            raise SystemExit(f"{path}: sha256 differs from manifest.json")
    dest.mkdir(parents=True, exist_ok=True)
    model = dest / manifest["model"]["name"]
    with model.open("wb") as g:
        for part in range(manifest["model"]["parts"]):
            path = files[f"model.part{part}"]
            assert path is not None
            g.write(path.read_bytes())
    if sha256(model) != manifest["model"]["sha256"]:
        raise SystemExit(f"{model}: the joined parts' sha256 differs from the original's")
    return model


def check(out: Path, limit_mib: float) -> None:
    """Each piece's call size (tracked tree + piece) under the limit, and the parts joined back into the same file."""
    tree = tree_bytes()
    folders = sorted(out.glob("piece-*"))
    sizes = [tree + sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) for folder in folders]
    for folder, size in zip(folders, sizes):
        print(f"{folder.name}: {size / MIB:.1f} MiB with the working tree ({tree / MIB:.1f})")
        if size > limit_mib * MIB:
            raise SystemExit(f"{folder}: {size / MIB:.1f} MiB with the tree, over {limit_mib} MiB")
    with tempfile.TemporaryDirectory() as tmp:
        model = join(folders, Path(tmp))
        print(f"joined {model.name}: {model.stat().st_size} bytes, sha256 as the original's")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / ".device")
    ap.add_argument("--limit-mib", type=float, default=64)
    ap.add_argument("--check", action="store_true", help="only check pieces built before")
    ap.add_argument("--join", type=Path, metavar="FOLDER", help="join the model's parts kept in FOLDER into --to "
                    "(exit 4 while parts are missing): what bench/device-real.sh runs on the device")
    ap.add_argument("--to", type=Path)
    args = ap.parse_args()
    if args.join:
        if None in located([args.join])[1].values():
            print(f"{args.join}: not every piece is here yet (manifest.json lists them)", file=sys.stderr)
            raise SystemExit(4)
        print(join([args.join], args.to))
        return
    if not args.check:
        manifest = build(args.out, args.limit_mib)
        print(f"{manifest['pieces']} pieces in {args.out}: one device call each, in order, e.g. "
              f"run(command=\"bash bench/device-real.sh\", carry=[\".device/piece-1\"])")
    check(args.out, args.limit_mib)


if __name__ == "__main__":
    main()
