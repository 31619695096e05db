"""Build notebooks/minibt_colab.ipynb (nbformat 4). Edit this file, not the notebook, then run:

    python notebooks/build_notebook.py

tests/test_recipes.py checks that the notebook is valid, matches this script, and that its shell
commands (with the parameters cell's defaults) are README's; tests/test_notebook.py runs every cell
on a CPU, with the parameters cell replaced.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
NOTEBOOK = HERE / "minibt_colab.ipynb"

CELLS = [
    ("md", """# minibt on a Colab T4: instruction backtranslation end to end

This notebook runs [`recipes/colab-t4.yaml`](../recipes/colab-t4.yaml): the Humpback method
(Li et al. 2023, *Self-Alignment with Instruction Backtranslation*) on a 1B **base** model loaded once
in 4-bit, with QLoRA adapters for every role: `myx` (backward), `m0` (seed model, first curator) and
`m1` (trained on seed + curated pairs). Seed: OpenAssistant first turns (`OpenAssistant/oasst1`);
unlabelled texts: `HuggingFaceFW/fineweb-edu`, streamed.

**Runtime > Change runtime type > T4 GPU.** The whole run takes about 3-4 hours on a T4 (an estimate:
see the recipe's comments); set `OVERRIDES = "corpus.limit=5000"` below for a first pass of about 1.5 hours.
A rerun of the same command resumes: finished stages and shards are skipped.

The cell below holds the notebook's settings; the defaults are the Colab run."""),
    ("parameters", """RECIPE = "recipes/colab-t4.yaml"  # a recipe file, or a built-in's name (`minibt recipes` lists them)
OVERRIDES = ""  # recipe overrides for the run commands, e.g. "corpus.limit=5000 curate.threshold=4"
RUN = "runs/colab-t4"  # the run directory: the run writes it, the cells below read it
MAX_NEW_TOKENS = 300  # answer length in the m0 / m1 comparison
ON_COLAB = True  # False skips the cells that need Colab: GPU check, install, Google Drive, Hub upload"""),
    ("code", """if ON_COLAB:
    !nvidia-smi"""),
    ("md", """## Install

minibt is installed from a clone of its repository, so the recipe can be edited in place in `recipes/`.
The recipes also ship inside the package: without a clone, `pip install "minibt[unsloth] @ git+URL"`
and `minibt run colab-t4` run the same recipe (`minibt recipes copy colab-t4` writes it out to edit).
The URL below is a **placeholder**: replace `OWNER` with the account that hosts minibt, or upload a
local clone to `/content/minibt` and skip the `git clone` line.
`pip` may replace Colab's torch with a version inside unsloth's range; restart the runtime if asked."""),
    ("code", """if ON_COLAB:
    %cd /content
    !git clone https://github.com/OWNER/minibt.git  # placeholder URL: see above
    %cd /content/minibt
    !pip install -q -e ".[unsloth]"
    !pip install -q -e ".[serve]"  # FastAPI and uvicorn, for `minibt serve` below
    # !pip install -q -e ".[vllm]"  # optional: augment and curate on vLLM (README, "Inference engines"); not verified on a GPU by this project"""),
    ("md", """Optional: keep the run directory on Google Drive, so a disconnected session resumes where it
stopped (the run writes every file atomically; Drive is slower than the local disk)."""),
    ("code", """# from google.colab import drive
# drive.mount("/content/drive")
# !mkdir -p /content/drive/MyDrive/minibt-runs && ln -sfn /content/drive/MyDrive/minibt-runs runs"""),
    ("md", """## Run

The dry run validates the recipe, prints the stage plan and an estimate of peak GPU memory per
stage, and loads nothing. Then the run itself: base model, `myx`, self-augmentation, `m0`,
self-curation, `m1`."""),
    ("code", "!minibt run {RECIPE} {OVERRIDES} --out {RUN} --dry-run"),
    ("code", "!minibt run {RECIPE} {OVERRIDES} --out {RUN}"),
    ("md", """## The curated data

`data/scored_r1.jsonl` holds every augmented pair with the curator's (`m0`) rubric score and whether it
was kept (score >= `curate.threshold`); `data/curated_r1.jsonl` the pairs kept, which `m1` trained on
with the augmented tag."""),
    ("code", """import pandas as pd

pd.set_option("display.max_colwidth", 200)
scored = pd.read_json(f"{RUN}/data/scored_r1.jsonl", lines=True)
curated = scored[scored["kept"]]  # the rows of data/curated_r1.jsonl
print(f"kept {len(curated)} of {len(scored)} augmented pairs")
curated.sort_values("expected_score", ascending=False)[["instruction", "output", "expected_score"]].head(10)"""),
    ("code", """import matplotlib.pyplot as plt
import yaml

threshold = yaml.safe_load(open(f"{RUN}/recipe.yaml"))["curate"]["threshold"]
plt.hist(scored["expected_score"], bins=40, range=(1, 5))
plt.axvline(threshold, color="red", linestyle="--", label=f"threshold {threshold}")
plt.xlabel("expected rubric score (m0)")
plt.ylabel("augmented pairs")
plt.legend()
plt.show()"""),
    ("md", """## m0 and m1 side by side

The Python API loads the base once and switches adapters by name (`set_adapter`, not a reload).
`m0` learned from the seed only; `m1` from the seed plus the curated pairs."""),
    ("code", """import minibt

s = minibt.open_run(RUN)
questions = [
    "Explain why the sky is blue to a ten-year-old.",
    "Give me three tips for writing a clear scientific abstract.",
    "What is the difference between a virus and a bacterium?",
]
m0 = s.generate(questions, adapter="m0", max_new_tokens=MAX_NEW_TOKENS)
m1 = s.generate(questions, adapter="m1", max_new_tokens=MAX_NEW_TOKENS)
for q, a, b in zip(questions, m0, m1):
    print(f"### {q}\\n--- m0 ---\\n{a}\\n--- m1 ---\\n{b}\\n")"""),
    ("md", """## Serve the run

`minibt serve` puts the run's adapters behind an OpenAI-compatible endpoint (README, "Serve a run"): a
request's `model` names the adapter. The cell starts it in the background, asks `m0` and `m1` the same
question with the `openai` client, and stops it."""),
    ("code", """import subprocess
import time

import httpx
from openai import OpenAI

server = subprocess.Popen(["minibt", "serve", RUN, "--port", "8000"])  # 127.0.0.1 only; --engine hf|vllm to choose
url = "http://127.0.0.1:8000/v1"
for _ in range(600):  # until it answers: the base loads first (a vLLM server takes minutes)
    try:
        httpx.get(f"{url}/models")
        break
    except httpx.TransportError:
        assert server.poll() is None, "minibt serve stopped: its output is in the notebook's log"
        time.sleep(1)
else:
    raise TimeoutError("minibt serve did not answer in 10 minutes")
client = OpenAI(base_url=url, api_key="unused")
for model in ("m0", "m1"):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": questions[0]}],
                                           max_tokens=MAX_NEW_TOKENS)
    print(f"{model} (served): {reply.choices[0].message.content}\\n")
server.terminate()  # SIGTERM: it finishes what it was answering and stops
server.wait()"""),
    ("md", """## Save the adapters

Each adapter is a plain PEFT folder (safetensors, tokenizer and chat template), so
`PeftModel.from_pretrained(base, folder)` loads it without minibt. Copy them to Google Drive, or
upload one to the Hugging Face Hub (a write token is asked for)."""),
    ("code", """if ON_COLAB:
    import shutil
    from pathlib import Path

    from google.colab import drive

    drive.mount("/content/drive")
    shutil.copytree(f"{RUN}/adapters", f"/content/drive/MyDrive/minibt/{Path(RUN).name}-adapters", dirs_exist_ok=True)"""),
    ("code", """if ON_COLAB:
    from huggingface_hub import create_repo, login, upload_folder

    login()
    repo = "YOUR_NAME/minibt-colab-t4-m1"  # your account and a repo name
    create_repo(repo, private=True, exist_ok=True)
    upload_folder(repo_id=repo, folder_path=f"{RUN}/adapters/m1", commit_message="minibt m1 adapter (colab-t4 recipe)")"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata = {
        "accelerator": "GPU",
        "colab": {"provenance": [], "gpuType": "T4"},
        "kernelspec": {"display_name": "Python 3", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for kind, source in CELLS:
        if kind == "md":
            nb.cells.append(new_markdown_cell(source))
        else:  # the parameters cell is tagged as papermill finds it; tests/test_notebook.py replaces it
            nb.cells.append(new_code_cell(source, metadata={"tags": ["parameters"]} if kind == "parameters" else {}))
    for i, cell in enumerate(nb.cells):  # stable ids: rebuilding gives the same file
        cell["id"] = f"cell-{i:02d}"
    return nb


if __name__ == "__main__":
    nb = build()
    nbformat.validate(nb)
    nbformat.write(nb, NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
