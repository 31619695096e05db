"""Guards around the training stack's own behaviour on the GPU path, each checked against
the pinned sources (accelerate 1.16, transformers 5.17, bitsandbytes 0.50, unsloth 2026.10.9).

The engine calls these; each says which line of which library it answers.
"""

from __future__ import annotations

import gc
import importlib.abc
import sys
from typing import Any

import torch

from minibt.errors import MinibtError

# --- 1. accelerate's mixed-precision wrapper --------------------------------------------------


def drop_mixed_precision_wrapper(model: Any) -> None:
    """Undo what `accelerator.prepare(model)` did to the shared model under fp16/bf16.

    accelerate/accelerator.py:1791-1801 replaces `model.forward` with autocast + convert-to-fp32 and
    keeps the original in `model._original_forward`; nothing removes it after `trainer.train()`, so every
    later direct call (scoring, the decode loop) would run under autocast. `_is_accelerate_prepared`
    (set at :2046) is cleared too: with it left, the next trainer's prepare returns early (:1773) and
    that training would run with no autocast at all.
    """
    from accelerate.utils import extract_model_from_parallel

    if "_original_forward" in model.__dict__:
        extract_model_from_parallel(model, keep_fp32_wrapper=False)  # accelerate/utils/other.py:351-361
        forward = model.__dict__.get("forward")
        bound_to: Any = getattr(forward, "__self__", None)  # Any: `is model` below would otherwise narrow model to None
        if bound_to is model and getattr(forward, "__func__", None) is type(model).forward:
            del model.forward  # the class's own method again, not an instance copy of it
    model.__dict__.pop("_is_accelerate_prepared", None)


# --- 3. memory after an out-of-memory error ---------------------------------------------------


def free_memory() -> None:
    """Collect the failed attempt's objects (trainers hold reference cycles), then return CUDA's cache.
    Call it outside the `except` block: a live traceback keeps the failed frames' tensors alive."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- 4. fully masked rows in sdpa, and a finiteness check ---------------------------------------

SAFE_SDPA = "minibt_sdpa"  # sdpa attention whose mask leaves no query row without a key


def _sdpa_mask_without_empty_rows(*args: Any, **kwargs: Any) -> Any:
    """transformers' sdpa mask, with each row that sees no key (a left pad) opened to every key.

    transformers/masking_utils.py:373-530 (5.17) no longer corrects such rows (`allow_torch_fix` "has no
    effect anymore", :372); torch's CUDA kernels then give NaN for them in fp16 (measured by unsloth on a
    B200: unsloth/import_fixes.py:2016-2037), and the NaN reaches real rows through 0 * NaN in the next
    layer. The pad rows' outputs are never read, so opening them changes no result. (CPU torch 2.13
    returns zeros for such rows: there the change is a no-op.)"""
    from transformers import masking_utils

    mask = masking_utils.sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return mask | ~mask.any(dim=-1, keepdim=True)


def use_safe_sdpa(model: Any) -> bool:
    """Switch a transformers model that runs sdpa to SAFE_SDPA (this model only: transformers' own
    "sdpa" stays as it is for everything else in the process). Returns whether it switched."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False  # eager masks with finfo.min, which softmax survives; flash kernels take no mask
    AttentionInterface.register(SAFE_SDPA, ALL_ATTENTION_FUNCTIONS["sdpa"])
    AttentionMaskInterface.register(SAFE_SDPA, _sdpa_mask_without_empty_rows)
    model.set_attn_implementation(SAFE_SDPA)
    return True


def check_finite(logits: torch.Tensor, adapter: str, what: str, dtype: torch.dtype) -> None:
    """Fail loudly on NaN/inf logits: argmax would pick token 0 and curation would drop pairs silently."""
    if not bool(torch.isfinite(logits).all()):
        rows = (~torch.isfinite(logits).reshape(logits.shape[0], -1).all(-1)).sum().item()
        raise MinibtError(f"non-finite logits in {what} with adapter {adapter!r} ({rows} of {logits.shape[0]} rows, "
                          f"{str(dtype).removeprefix('torch.')} compute): the numbers overflowed; try model.dtype=bfloat16 "
                          f"or float32")


# --- 5. pre-quantized repos -------------------------------------------------------------------


def prequantized(config: Any) -> dict[str, Any] | None:
    """The quantization_config a repo's config.json carries (a pre-quantized repo), as a dict, else None."""
    q = getattr(config, "quantization_config", None)
    if q is None:
        return None
    return dict(q) if isinstance(q, dict) else q.to_dict()


def check_prequantized(name: str, q: dict[str, Any], quantization: str) -> None:
    """Refuse what minibt cannot run as promised: a 4-bit NF4 bitsandbytes base, or a 16-bit one."""
    method = str(q.get("quant_method", ""))
    if quantization == "none":
        raise MinibtError(f"model.quantization: {name} is pre-quantized ({method}); it cannot load in full precision: "
                          f"set model.quantization=nf4 or use the 16-bit repo")
    if method != "bitsandbytes" or not q.get("load_in_4bit") or q.get("bnb_4bit_quant_type") != "nf4":
        what = f"{method} {q.get('bnb_4bit_quant_type', '')}".strip() if method == "bitsandbytes" else method
        raise MinibtError(f"model.name: {name} is pre-quantized as {what or 'unknown'}; minibt runs bitsandbytes 4-bit "
                          f"NF4 bases: use an NF4 repo or the 16-bit one")


def force_compute_dtype(model: Any, dtype: torch.dtype) -> int:
    """Make every 4-bit layer compute in the recipe's dtype.

    For a pre-quantized repo transformers keeps the repo's quantization_config whatever is passed
    (transformers/quantizers/auto.py:244-283: BitsAndBytesConfig is not among the configs whose loading
    attributes are taken from the arguments), so its bnb_4bit_compute_dtype (bf16 in unsloth's repos)
    would win: emulated and slow on a T4. bitsandbytes reads `compute_dtype` on every forward
    (bitsandbytes/nn/modules.py:622-628). Returns the layers set."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            module.compute_type_is_set = True
            n += 1
    q = getattr(model.config, "quantization_config", None)
    if n and q is not None and hasattr(q, "bnb_4bit_compute_dtype"):
        q.bnb_4bit_compute_dtype = dtype
    return n


# --- the base's embeddings: unsloth's fix_untrained_tokens --------------------------------------


def embedding_sums(model: Any) -> list[torch.Tensor]:
    """Per-row fp32 sums of the base's input and output embeddings (a tripwire, no copy of the weights).

    unsloth's SFTTrainer calls unsloth_zoo's fix_untrained_tokens at __init__ (unsloth/models/
    rl_replacements.py:140-149) and at train() (unsloth/tokenizer_utils.py:1998). It writes rows in place
    (unsloth_zoo/tokenizer_utils.py:790-791) only when embed_tokens and lm_head require grad (:675-679);
    minibt trains LoRA weights only (Engine.check_trainable, before and after the trainer is built),
    so there it returns or raises ValueError (:679-752) but never edits. This catches a future version that does."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weights = {id(m.weight): m.weight for m in (base.get_input_embeddings(), base.get_output_embeddings())
               if m is not None and getattr(m, "weight", None) is not None}
    with torch.no_grad():
        return [torch.sum(w, dim=-1, dtype=torch.float32) for w in weights.values()]


# --- 6. the device ----------------------------------------------------------------------------


def require_device(device: str, toy: bool) -> None:
    """A real recipe runs on a GPU: without CUDA it stops, unless it says `model.device: cpu` or is the toy."""
    gpu = torch.cuda.is_available()
    if device == "cpu" and gpu:
        raise MinibtError("model.device: cpu, but a CUDA GPU is visible and minibt uses it; remove model.device "
                          "(or hide the GPU: CUDA_VISIBLE_DEVICES=)")
    if not gpu and not toy and device != "cpu":
        raise MinibtError(f"model.device: torch {torch.__version__} sees no CUDA GPU, and this recipe would train on the "
                          "CPU for days; check `python -c 'import torch; print(torch.cuda.is_available())'` (a torch "
                          "built for another CUDA driver sees none), or set model.device=cpu to run on the CPU anyway")


# --- 7. unsloth's import beside vLLM's CPU build ----------------------------------------------


class _Hidden(importlib.abc.MetaPathFinder):
    """A finder that says one module is not there."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == self.name:
            raise ModuleNotFoundError(f"{fullname} is hidden while unsloth imports", name=fullname)
        return None


def import_unsloth() -> None:
    """Import unsloth (it patches transformers and trl, so before they are imported).

    unsloth/import_fixes.py `disable_broken_vllm` probes `vllm._C` whenever vLLM is installed. In vLLM's CPU build
    that module is the AVX-512 BF16 kernel library, which vLLM itself loads only on CPUs that have those
    instructions (vllm/platforms/cpu.py `import_kernels` takes _C_AVX2 otherwise); on any other CPU the probe
    kills the process with SIGILL, before a line is printed. The probe skips a module it cannot find, so without
    CUDA that one module is hidden while unsloth imports; vLLM's own import is untouched afterwards.
    """
    hidden = None if torch.cuda.is_available() else _Hidden("vllm._C")
    if hidden is not None:
        sys.meta_path.insert(0, hidden)
    try:
        import unsloth  # noqa: F401
    finally:
        if hidden is not None:
            sys.meta_path.remove(hidden)
