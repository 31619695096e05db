"""The Colab notebook runs, every cell, on a CPU: its parameters cell replaced by the built-in cpu-135m recipe
on the real model (SmolLM2-135M-Instruct) and the tests' small fixtures, cut to a few steps as
tests/test_real_model.py cuts it (8 texts); the Colab-only cells (GPU check, install, Drive, Hub) are skipped by
ON_COLAB = False, every other cell runs as a Colab user runs it."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).parent.parent
NOTEBOOK = ROOT / "notebooks" / "minibt_colab.ipynb"
QUESTIONS = 3  # the m0 / m1 cell's questions


def parameters(model: str, run: Path) -> str:
    """tests/test_real_model.py's overrides, with 8 texts instead of 12: the cells need a run, not its numbers,
    and augment and curate time scales with the texts."""
    overrides = [f"model.name={model}", "seed.dataset=null", "seed.path=tests/fixtures/oasst_tiny.jsonl",
                 "corpus.dataset=null", "corpus.name=null", "corpus.path=tests/fixtures/web_shard.parquet",
                 "corpus.limit=8", "backward.epochs=3", "backward.max_steps=4", "forward.epochs=3", "forward.max_steps=2",
                 "augment.max_new_tokens=40", "model.max_length=512"]
    return "\n".join(['RECIPE = "cpu-135m"', f"OVERRIDES = {' '.join(overrides)!r}", f"RUN = {str(run)!r}",
                      "MAX_NEW_TOKENS = 12", "ON_COLAB = False"])


def with_exit_checks(nb):
    """After each cell that runs `!minibt`, a cell that fails if it failed: a shell line's exit status is
    not an exception, and the cells after it would fail later with a less clear error."""
    cells = []
    for cell in nb.cells:
        cells.append(cell)
        if cell.cell_type == "code" and cell.source.startswith("!minibt "):
            cells.append(nbformat.v4.new_code_cell(f"assert _exit_code == 0, 'failed: ' + {cell.source!r}"))
    nb.cells = cells
    return nb


def text(cell, streams=("stdout",)) -> str:
    """What a cell printed (stderr holds progress bars and warnings)."""
    return "".join(o.text for o in cell.get("outputs", []) if o.output_type == "stream" and o.name in streams)


@pytest.mark.slow
def test_every_cell_runs_on_a_cpu_on_the_real_model(tmp_path, monkeypatch):
    from minibt.bench.smollm2 import folder

    model = folder()  # converted once into MINIBT_CACHE; checks the base's greedy answer
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [params] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = parameters(str(model), tmp_path / "run")
    nb = with_exit_checks(nb)
    # the kernel and its shell lines: this venv's minibt first on PATH, one torch thread (the run's recipe says
    # so for `minibt run`; the kernel's open_run reads this), matplotlib's inline backend as in Colab
    monkeypatch.setenv("PATH", os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()
    except CellExecutionError as e:
        tail = "".join(text(c, ("stdout", "stderr")) for c in nb.cells if c.cell_type == "code")[-4000:]
        pytest.fail(f"{e}\n--- the notebook's output, last 4000 characters ---\n{tail}")

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code)  # every code cell ran
    assert not any(o.output_type == "error" for c in code for o in c.outputs)
    shown = "\n".join(text(c) for c in code)
    assert "stages: prepare -> backward -> augment -> m0 -> curate_r1 -> m1" in shown  # the dry run's plan
    kept = re.search(r"^kept (\d+) of (\d+) augmented pairs$", shown, re.M)
    assert kept, shown[-2000:]
    data = tmp_path / "run" / "data"
    assert (int(kept[1]), int(kept[2])) == tuple(len((data / f).read_text().splitlines())
                                                 for f in ("curated_r1.jsonl", "scored_r1.jsonl"))
    [histogram] = [c for c in code if "plt.hist(" in c.source]
    assert any("image/png" in o.get("data", {}) for o in histogram.outputs)  # drawn inline, as on Colab
    [side_by_side] = [text(c) for c in code if "--- m0 ---" in text(c)]
    answers = re.findall(r"^### [^\n]+\n--- m0 ---\n(.*?)\n--- m1 ---\n(.*?)\n\n", side_by_side, re.M | re.S)
    assert len(answers) == QUESTIONS and all(a.strip() and b.strip() for a, b in answers), side_by_side
    assert (tmp_path / "run" / "adapters" / "m1" / "adapter_model.safetensors").is_file()
