"""The engine: ONE base model, loaded once (4-bit NF4 by default), and the named LoRA adapters on it.

Every role of the method is an adapter on this one base: `myx` (backward), `m0`, `m1`, ... (forward;
the curator of round k is m_{k-1}). Switching roles is `set_adapter`, never a reload. Only this
package imports unsloth or bitsandbytes. Its rooms, each with one reason to change:

    load.py         a ModelSection -> weights and tokenizer (backends, 4-bit, chat template, safetensors)
    adapters.py     the role adapters on the one base: add, load, save, delete, switch (`use`); the LoRA config
    train.py        training a role with trl (the SFTConfig); checkpoints.py: resuming mid-training
    interface.py    the inference seam (`Inference`) every inference engine implements
    text.py         the text rules every inference engine follows: render, count, clip, fit, score ids
    infer.py        the HF inference engine: generation, next-token scoring, log-likelihoods
    batching.py     prompts as token batches (the generation budget, OOM halving, the shared head)
    sampling.py     the next token and its explicit random streams
    hf.py           `Engine`: the loaded base, its adapters, training, and its inference (`Engine.infer`)
"""

from minibt.engine.adapters import BaseOnly, lora_config
from minibt.engine.batching import MIN_NEW_TOKENS, generation_budget
from minibt.engine.checkpoints import clear_checkpoints
from minibt.engine.hf import Engine
from minibt.engine.infer import HFInference
from minibt.engine.interface import BASE, Inference
from minibt.engine.load import (
    compute_dtype,
    guard_bnb_cpu,
    has_gpu,
    import_backend,
    load_base,
    load_tokenizer,
    load_weights,
    resolve_backend,
    set_chat_template,
)
from minibt.engine.train import sft_config

__all__ = [
    "BASE", "MIN_NEW_TOKENS", "BaseOnly", "Engine", "HFInference", "Inference", "clear_checkpoints", "compute_dtype",
    "generation_budget", "guard_bnb_cpu", "has_gpu", "import_backend", "load_base", "load_tokenizer", "load_weights",
    "lora_config", "resolve_backend", "set_chat_template", "sft_config",
]


def _implements_inference(hf: HFInference) -> Inference:
    """Never called: the type checker holds the HF engine to the `Inference` Protocol here (engine/vllm.py holds
    the vLLM engine)."""
    return hf
