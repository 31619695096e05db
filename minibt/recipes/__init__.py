"""The built-in recipes, shipped inside the package so an installed minibt (a wheel, `pip install git+...`)
runs them by name: `minibt run toy`. A repository clone also sees them as `recipes/*.yaml` (a symlink)."""

from __future__ import annotations

from pathlib import Path

from minibt import io
from minibt.errors import RecipeError

FOLDER = Path(__file__).parent


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.yaml"))


def _stem(name: str) -> str:
    return name[: -len(".yaml")] if name.endswith(".yaml") else name


def builtin_path(name: str) -> Path:
    """The file of built-in recipe `name` ("toy" or "toy.yaml")."""
    stem = _stem(name)
    if stem not in names():
        raise RecipeError(f"{name}: not a built-in recipe (built-ins: {', '.join(names())})")
    return FOLDER / f"{stem}.yaml"


def resolve(arg: str | Path) -> Path:
    """A recipe argument: an existing file wins, then a built-in name; anything else is a one-line error."""
    path = Path(arg)
    if path.is_file():
        return path
    stem = _stem(path.name)
    if stem in names() and path.name == str(arg):  # a bare name, not a path to a missing file
        return builtin_path(stem)
    hint = f"; did you mean the built-in {stem!r}?" if stem in names() else ""
    raise RecipeError(f"{arg}: no such recipe file, and not a built-in recipe (built-ins: {', '.join(names())}; "
                      f"`minibt recipes` lists them){hint}")


def summary(name: str) -> str:
    """The recipe's first comment line: what it is for."""
    for line in builtin_path(name).read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip().rstrip(":")
    return ""


def copy(name: str, dest: str | Path | None = None, force: bool = False) -> Path:
    """Write built-in recipe `name` to `dest` (a file, or a folder to put <name>.yaml in; default: the
    current folder) to edit; an existing file is kept unless `force`."""
    source = builtin_path(name)
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise RecipeError(f"{target}: already exists (--force replaces it)")
    io.write_text(target, source.read_text(encoding="utf-8"))  # atomic
    return target
