"""`minibt export`: an adapter of a run as a plain transformers model folder (or its PEFT folder), and
optionally on the Hugging Face Hub.

The merge happens on the weights the adapter trained against: a run with an NF4 base merges into that
base dequantized (engine/dequantize.py), not into the original 16-bit weights, which answer differently
with the same adapter. The base is loaded in fp32, the PEFT adapter applied, `merge_and_unload`, then
cast to --dtype (bf16 by default) and saved (`save_pretrained(safe_serialization=True)`) with the
tokenizer and its chat template. The folder loads with `AutoModelForCausalLM.from_pretrained` /
`AutoTokenizer.from_pretrained`, no minibt. The run's recipe and manifest keep naming the original base.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from minibt.engine import BASE
from minibt.errors import MinibtError
from minibt.rundir import RunDir

log = logging.getLogger("minibt.export")

DTYPES = ("bfloat16", "float16", "float32")


def _card(run: RunDir, adapter: str, base: str, merged: bool, dtype: str) -> str:
    recipe = run.recipe()
    nf4 = recipe.model.quantization == "nf4"
    into = (f"`{base}` as the run trained against it: its bitsandbytes NF4 4-bit weights (double quantization), "
            f"dequantized" if nf4 else f"`{base}`")
    what = (f"the minibt adapter `{adapter}` merged into {into} ({dtype})" if merged else
            f"the PEFT LoRA adapter `{adapter}` for `{base}`" + (" loaded in 4-bit NF4 (bitsandbytes), as it was trained" if nf4 else ""))
    tag = recipe.forward.seed_tag if recipe.forward.tags else None
    usage = (f'Use the system prompt "{tag}" (the seed tag the model was trained with) and the tokenizer\'s chat template.'
             if tag else "Use the tokenizer's chat template.")
    return (f"---\nlibrary_name: {'transformers' if merged else 'peft'}\ntags: [minibt, instruction-backtranslation]\n---\n\n"
            f"# {run.manifest.get('recipe', run.path.name)}: {adapter}\n\n"
            f"This is {what}, trained by [minibt](https://arxiv.org/abs/2308.06259)-style instruction backtranslation "
            f"(Li et al. 2023, Humpback) with QLoRA on a 4-bit base.\n\n{usage}\n")


def export(run_dir: str | Path, adapter: str, out: str | Path | None, dtype: str = "bfloat16", adapter_only: bool = False,
           force: bool = False, push_to_hub: str | None = None, private: bool = False) -> Path:
    """Write `out` (a merged model folder, or a copy of the adapter folder with adapter_only), optionally push it.

    Returns the folder that was written (or, for an adapter pushed without --out, the run's adapter folder).
    """
    from minibt.base_model import model_of

    run = RunDir.open(run_dir)
    if adapter == BASE:
        raise MinibtError("--adapter: name an adapter of the run (export of the bare base is just the base)")
    src = run.adapter(adapter)
    if not (src / "adapter_config.json").is_file():
        raise MinibtError(f"adapter {adapter!r} does not exist in {run.path} (have: {', '.join(run.adapter_names()) or 'none'})")
    if dtype not in DTYPES:
        raise MinibtError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    base = model_of(run.recipe(), run.manifest.get("base_model")).name
    if out is None:
        if not (adapter_only and push_to_hub):
            raise MinibtError("--out DIR is needed (only an adapter pushed with --adapter-only --push-to-hub can go without)")
        folder = src
    else:
        out = Path(out)
        if out.exists() and any(out.iterdir()) and not force:
            raise MinibtError(f"{out} exists and is not empty; choose another --out or pass --force")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            if adapter_only:
                shutil.copytree(src, tmp, dirs_exist_ok=True)
            else:
                _merge(run, src, base, dtype, tmp)
            (tmp / "README.md").write_text(_card(run, adapter, base, not adapter_only, dtype), encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)  # the folder appears whole, like every other minibt output
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        folder = out
    if push_to_hub:
        push(folder, push_to_hub, private=private, message=f"minibt export: {adapter} ({'adapter' if adapter_only else 'merged ' + dtype})")
    return folder


def _merge(run: RunDir, adapter_dir: Path, base: str, dtype: str, dest: Path) -> None:
    import dataclasses

    import torch
    from peft import PeftModel

    from minibt.engine import load_tokenizer, load_weights
    from minibt.engine.dequantize import dequantized_base

    recipe = run.recipe()
    model_cfg = dataclasses.replace(recipe.model, name=base)
    weights = dequantized_base(model_cfg)  # the NF4 base as the adapter saw it (`base` itself when unquantized)
    if weights != base:
        model_cfg = dataclasses.replace(model_cfg, name=weights, revision=None)  # a local folder
    log.info("merging %s into %s in float32, saved as %s", adapter_dir.name, weights, dtype)
    model = load_weights(model_cfg, torch.float32, device={"": "cpu"})
    model = PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=True)  # LoRA in fp32 too
    model = model.merge_and_unload()
    model = model.to(getattr(torch, dtype))  # one dtype throughout
    tokenizer = load_tokenizer(recipe.model, adapter_dir)  # the run's tokenizer, with its chat template
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(dest), safe_serialization=True)
    tokenizer.save_pretrained(str(dest))


def push(folder: str | Path, repo: str, private: bool = False, message: str = "minibt export") -> str:
    """Create the hub repo (if needed) and upload `folder` to it; returns the repo id."""
    import huggingface_hub as hub

    hub.create_repo(repo, private=private, exist_ok=True, repo_type="model")
    hub.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model", commit_message=message)
    log.info("uploaded %s to https://huggingface.co/%s", folder, repo)
    return repo
