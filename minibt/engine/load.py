"""Loading a base model: THE place a ModelSection becomes weights and a tokenizer.

Backends: `unsloth` (the GPU fast path; default when a GPU and unsloth are present), `transformers`
(transformers + peft + bitsandbytes; GPU, or CPU 4-bit), and quantization `none` for full precision.
The rules every load follows live here: safetensors only, the recipe's revision and trust_remote_code,
4-bit NF4 with the recipe's compute dtype, the chat template, the bitsandbytes CPU guard. The engine,
the judge loaded on its own, export, IFEval's tokenizer and the bench's bare side all load here.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import torch

from minibt import stack_guards as guards
from minibt.errors import MinibtError
from minibt.prompts import CHAT_TEMPLATE
from minibt.sections import LoraSection, ModelSection

log = logging.getLogger("minibt.engine")


def has_gpu() -> bool:
    return torch.cuda.is_available()


def resolve_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    if has_gpu() and importlib.util.find_spec("unsloth") is not None:
        return "unsloth"
    return "transformers"


def import_backend(requested: str) -> None:
    """Import unsloth before anything imports transformers, when unsloth will be used (it patches them)."""
    if resolve_backend(requested) == "unsloth":
        guards.import_unsloth()


def compute_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if not has_gpu():
        return torch.float32
    # torch counts emulated bf16 as supported (a T4 says yes): ask for the real thing
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def device_map() -> dict[str, str]:
    return {"": "cuda:0" if has_gpu() else "cpu"}


def bnb_config(dtype: torch.dtype) -> Any:
    """The 4-bit quantization minibt runs: NF4, double quantization, compute in `dtype`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def set_chat_template(tokenizer: Any, cfg: ModelSection) -> None:
    """The tokenizer's own chat template, or minibt's (`model.chat_template: minibt`, or it has none);
    EOS becomes the token the template ends an assistant turn with (`end_of_turn`), so generation stops
    there and training ends each output with it; it pads with EOS when it has no pad token."""
    if cfg.chat_template == "minibt" or not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    turn_end = end_of_turn(tokenizer)
    if turn_end is not None and turn_end != tokenizer.eos_token:
        log.info("EOS set to %s, the chat template's end of turn (the tokenizer said %s)", turn_end, tokenizer.eos_token)
        tokenizer.eos_token = turn_end
    if tokenizer.eos_token is None:
        raise MinibtError(f"model.name: the tokenizer of {cfg.name} has no EOS token, so generations cannot stop")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


_MARK = "minibt-turn-content"


def end_of_turn(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant's words, or None.

    Families differ: a tokenizer's EOS is often not what an instruct template ends turns with (Llama 3's
    <|end_of_text|> vs <|eot_id|>, ChatML's <|im_end|>; a GGUF conversion can even name <|im_start|>).
    A template that ends turns in plain text (no special token) keeps the tokenizer's EOS.
    """
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _MARK}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this shape (e.g. requires a system turn) tells nothing
        return None
    after = rendered.split(_MARK, 1)[1] if _MARK in rendered else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    if not ids:
        return None
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return tokenizer.convert_ids_to_tokens(ids[0]) if ids[0] in special else None


def guard_bnb_cpu(model: Any) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU kernel (silently).

    On CPUs with AVX512-BF16 the first no-grad eval forward repacks every Linear4bit in place, and LoRA
    gradients computed afterwards are wrong (17-41 % off) with only a warning. Returns the count guarded.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def require_safetensors(name: str) -> None:
    """Pickled weights can run code when loaded: a local base must come as safetensors."""
    path = Path(name).expanduser()
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise MinibtError(f"model.name: {name} has no .safetensors weights (minibt loads safetensors only)")


def _hub(cfg: ModelSection) -> dict[str, Any]:
    return dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


def load_tokenizer(cfg: ModelSection, folder: str | Path | None = None) -> Any:
    """The tokenizer of `cfg`'s base, or of a folder minibt saved (a run's adapter), with its chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder or cfg.name), **_hub(cfg))
    set_chat_template(tokenizer, cfg)
    return tokenizer


def load_weights(cfg: ModelSection, dtype: torch.dtype, device: dict[str, str] | None = None,
                 quantization_config: Any = None) -> Any:
    """`cfg.name`'s causal LM as the repo has it, in `dtype` (safetensors only; nothing of minibt's
    runtime added: export merges into this)."""
    from transformers import AutoModelForCausalLM

    require_safetensors(cfg.name)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    return AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype, use_safetensors=True,
                                                device_map=device or device_map(), **extra, **_hub(cfg))


def load_base(cfg: ModelSection) -> tuple[Any, Any]:
    """(model, tokenizer) of the base as minibt runs it on the transformers backend: NF4 (quantization
    `nf4`, computing in the recipe's dtype) or 16-bit, the CPU guard, sdpa that gives no NaN on left
    pads, a KV cache for generation. No adapters: the engine adds its own (`adapters.wrap`)."""
    from transformers import AutoConfig

    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code is true: the model's own Python code from %s will run", cfg.name)
    dtype = compute_dtype(cfg.dtype)
    t0 = time.time()
    try:
        require_safetensors(cfg.name)
        tokenizer = load_tokenizer(cfg)
        quantization = None
        baked = guards.prequantized(AutoConfig.from_pretrained(cfg.name, **_hub(cfg)))
        if baked is not None:  # its own config is used whatever is passed; checked here, its compute dtype set below
            guards.check_prequantized(cfg.name, baked, cfg.quantization)
        elif cfg.quantization == "nf4":
            quantization = bnb_config(dtype)
        model = load_weights(cfg, dtype, quantization_config=quantization)
    except OSError as e:  # not on the hub, no network, gated repo, missing files
        raise MinibtError(f"model.name: cannot load {cfg.name}: {str(e).splitlines()[0]}") from None
    if cfg.quantization == "nf4":
        guards.force_compute_dtype(model, dtype)
        if not has_gpu():
            guard_bnb_cpu(model)
    guards.use_safe_sdpa(model)
    model.config.use_cache = True
    log.info("loaded %s (transformers, %s) in %.1fs", cfg.name, cfg.quantization, time.time() - t0)
    return model, tokenizer


def load_unsloth(cfg: ModelSection, lora: LoraSection, seed: int) -> tuple[Any, Any]:
    """(PeftModel, tokenizer) from unsloth's loader: a 4-bit base with unsloth's own (unnamed) first
    adapter, the placeholder that role adapters replace (`adapters.Adapters`)."""
    if cfg.quantization != "nf4":
        raise MinibtError("model.backend: unsloth here runs 4-bit bases only; set model.quantization=nf4")
    from unsloth import FastLanguageModel  # patches transformers/trl on import

    from minibt.engine.adapters import lora_kwargs

    if cfg.trust_remote_code:
        log.warning("model.trust_remote_code is true: the model's own Python code from %s will run", cfg.name)
    dtype = compute_dtype(cfg.dtype)
    t0 = time.time()
    require_safetensors(cfg.name)
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=cfg.name, max_seq_length=cfg.max_length, dtype=dtype, load_in_4bit=True,
            use_safetensors=True, **_hub(cfg))
    except OSError as e:
        raise MinibtError(f"model.name: cannot load {cfg.name}: {str(e).splitlines()[0]}") from None
    # unsloth's CPU fallback quietly loads 16-bit weights when bitsandbytes 4-bit fails on this CPU
    # (or UNSLOTH_CPU_LOAD_IN_4BIT=0); this backend promises a 4-bit base, so refuse instead
    import bitsandbytes as bnb

    if not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        raise MinibtError(f"model.backend: unsloth loaded {cfg.name} without 4-bit layers; use model.backend=transformers")
    if not has_gpu():
        guard_bnb_cpu(model)  # unsloth's CPU fallback does this too; harmless to repeat
    guards.force_compute_dtype(model, dtype)  # a pre-quantized repo's own compute dtype would win (stack_guards)
    set_chat_template(tokenizer, cfg)
    # unsloth cannot name this adapter; it becomes the placeholder that role adapters replace.
    # On CPU "unsloth" checkpointing is plain recomputation: only costs time (the transformers backend skips it too)
    model = FastLanguageModel.get_peft_model(model, **lora_kwargs(lora), random_state=seed,
                                             use_gradient_checkpointing="unsloth" if has_gpu() else False)
    log.info("loaded %s (unsloth, %s) in %.1fs", cfg.name, cfg.quantization, time.time() - t0)
    return model, tokenizer
