"""Random-weight Llama models of real shapes, for the bench on a GPU (bench/gpu.md): speeds are real, scores are not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Real shapes for GPU runs (random weights: no hub on the device machine). From the models' config.json.
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False),
}  # fmt: skip


def build_random_model(name: str, tokenizer_dir: str, out_dir: Path) -> str:
    """A random-weight Llama with the real shapes of `name` (GPU_CONFIGS), saved with the toy tokenizer.

    The vocabulary keeps its real size (embedding and LM head cost what they do in the real model);
    the toy tokenizer only ever produces ids below its own size.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(**GPU_CONFIGS[name], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        # transformers types PreTrainedModel.to through a wrapper that reads the dtype as the model
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return str(out_dir)
