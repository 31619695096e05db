"""The 16-bit base a run's adapters trained against: its NF4 4-bit weights, dequantized, saved once.

A run trains its LoRA adapters on the base as bitsandbytes quantized it. Every place that runs those
adapters without bitsandbytes (vLLM's CPU build, a merged export) must run them on these weights, not
on the original 16-bit ones: on a small model NF4's rounding is large enough that the same adapter
scores and answers differently on the two. The base is loaded exactly as training loads it (`load_base`,
NF4 with the recipe's compute dtype), every `Linear4bit` is dequantized by bitsandbytes itself, and the
folder (safetensors, config, tokenizer) is written once under MINIBT_CACHE/dequantized/ and reused.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path
from typing import Any, cast

import torch

from minibt import io
from minibt.engine.load import bnb_config, compute_dtype, load_base
from minibt.errors import MinibtError
from minibt.sections import ModelSection

log = logging.getLogger("minibt.engine")

# Bump when what is written changes, so folders written by older code are not reused.
FORMAT = 1


def dequantized_base(cfg: ModelSection, cache: Path | None = None) -> str:
    """The name to load for `cfg`'s base in 16 bits: the NF4 base dequantized (a cached folder), or,
    for a base the run loads unquantized (quantization `none`), `cfg.name` itself."""
    if cfg.quantization != "nf4":
        return cfg.name
    final = Path(cache or io.cache_dir()) / "dequantized" / cache_key(cfg)
    if final.is_dir():
        return str(final)
    io.built_folder(final, lambda tmp: _write(cfg, tmp))
    log.info("dequantized %s (nf4) to %s", cfg.name, final)
    return str(final)


def cache_key(cfg: ModelSection) -> str:
    """<name>-<digest of: the weights' identity, the bitsandbytes settings and version, the dtype>."""
    import bitsandbytes

    dtype = compute_dtype(cfg.dtype)
    settings = bnb_config(dtype).to_dict()
    parts = [f"v{FORMAT}", _weights_identity(cfg), repr(sorted(settings.items())), bitsandbytes.__version__, str(dtype)]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    return f"{Path(cfg.name).name or 'base'}-nf4-{str(dtype).removeprefix('torch.')}-{digest}"


def _source(cfg: ModelSection) -> Path:
    """The folder the base's config.json is in: the local folder, or the hub cache's snapshot."""
    local = Path(cfg.name).expanduser()
    if local.is_dir():
        return local
    from transformers.utils import cached_file

    # str: cached_file returns None only when told not to raise on a missing file
    return Path(cast(str, cached_file(cfg.name, "config.json", revision=cfg.revision))).parent


def _weights_identity(cfg: ModelSection) -> str:
    """A local folder: the sha256 of its config and weights. A hub id: its name and resolved commit."""
    source = _source(cfg)
    if source.parent.name == "snapshots":  # the hub cache names each snapshot by its commit
        return f"hub:{cfg.name}@{source.name}"
    digest = hashlib.sha256()
    for path in sorted(source.glob("*.safetensors")) + [source / "config.json"]:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return f"folder:{digest.hexdigest()}"


def dequantized_state(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every weight of an NF4-loaded model as a plain tensor on the CPU, each `Linear4bit` weight
    dequantized by bitsandbytes; a tied weight appears once, under its first name."""
    import bitsandbytes as bnb

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()  # ids of the model's own tensors (alive throughout): a tied weight is one tensor
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        own.update((k, v) for k, v in module.named_buffers(recurse=False) if k not in module._non_persistent_buffers_set)
        for name, tensor in own.items():
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if isinstance(module, bnb.nn.Linear4bit) and name == "weight":
                # bitsandbytes' CPU repacking (the first eval forward, where unguarded) changes the layout
                if getattr(tensor.quant_state, "packing_format_for_cpu", False):
                    raise MinibtError(f"{prefix}: 4-bit weights repacked for the CPU kernel; dequantize from a fresh load")
                tensor = bnb.functional.dequantize_4bit(tensor.data, tensor.quant_state)
            key = f"{prefix}.{name}" if prefix else name
            state[key] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else None).contiguous()
    return state


def _write(cfg: ModelSection, out: Path) -> None:
    from huggingface_hub import save_torch_state_dict

    dtype = compute_dtype(cfg.dtype)
    log.info("dequantizing %s: loading it in 4-bit as training does, once", cfg.name)
    model, tokenizer = load_base(cfg)  # no forward pass before this: the weights are as quantized
    state = dequantized_state(model, dtype)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    config.use_cache = True
    save_torch_state_dict(state, str(out), max_shard_size="5GB")
    config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for code in _source(cfg).glob("*.py"):  # a trust_remote_code model's own classes, which config.json names
        shutil.copy(code, out / code.name)
