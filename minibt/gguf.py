"""A llama.cpp GGUF file as a base model: read through transformers' GGUF support, dequantized, and
saved once as a safetensors folder that every other part of minibt loads like any local model.

Converted once per file (cached under MINIBT_CACHE by the file's sha256), so the recipe's quantization,
vLLM, export and the tokenizer all see one ordinary folder. The tokenizer's special tokens and chat
template come from the file's own metadata: transformers' conversion takes eos from the bos field.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from minibt import io
from minibt.errors import RecipeError

log = logging.getLogger("minibt.engine")

# Bump when the conversion changes, so folders converted by older code are not reused.
FORMAT = 1
_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "pad_token": "padding_token_id",
            "unk_token": "unknown_token_id"}


def is_gguf(name: str | None) -> bool:
    return bool(name) and str(name).lower().endswith(".gguf")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The file's architecture, special tokens and chat template; a one-line error for a file that is
    missing or damaged. Reads the header only, with gguf-py: recipe checks run this before anything
    imports transformers (unsloth must patch it first)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RecipeError('model.name: a .gguf base needs the gguf package: pip install gguf') from None

    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"model.name: GGUF file {path} not found")
    try:
        fields = GGUFReader(str(path)).fields
    except Exception as e:  # a truncated or foreign file fails inside the reader in many ways
        raise RecipeError(f"model.name: {path} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    arch = value("general.architecture")
    tokens = fields.get("tokenizer.ggml.tokens")
    if not arch or tokens is None:
        raise RecipeError(f"model.name: {path} is a GGUF file without {'an architecture' if not arch else 'a tokenizer'}")
    special = {}
    for name, key in _SPECIAL.items():
        token_id = value(f"tokenizer.ggml.{key}")
        if token_id is not None:
            special[name] = bytes(tokens.parts[tokens.data[int(token_id)]]).decode("utf-8")
    return {"architecture": arch, "special_tokens": special, "chat_template": value("tokenizer.chat_template")}


def converted_folder(path: str | Path, cache: Path | None = None) -> Path:
    """The safetensors folder of the GGUF file at `path`, converted on first use."""
    path = Path(path).expanduser().resolve()
    meta = read_metadata(path)
    final = Path(cache or io.cache_dir()) / "gguf" / f"{path.stem}-{io.digest(path)['sha256'][:16]}-v{FORMAT}"
    if final.is_dir():
        return final
    io.built_folder(final, lambda tmp: _convert(path, meta, tmp))
    log.info("converted %s to %s", path.name, final)
    return final


def _convert(path: Path, meta: dict[str, Any], out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if meta["architecture"] not in GGUF_SUPPORTED_ARCHITECTURES:
        raise RecipeError(f"model.name: {path} holds a {meta['architecture']!r} model; transformers reads GGUF "
                          f"files of {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}")

    log.info("converting %s (GGUF, %s) to a safetensors folder, once", path.name, meta["architecture"])
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for name, token in meta["special_tokens"].items():
        setattr(tokenizer, name, token)
    if meta["chat_template"]:
        tokenizer.chat_template = meta["chat_template"]
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained: rebuild it from its config without the GGUF marker
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for name in ("bos_token", "eos_token", "pad_token"):
        if getattr(tokenizer, name, None) is not None:
            setattr(config, f"{name}_id", tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
