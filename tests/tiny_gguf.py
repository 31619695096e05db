"""A tiny random Llama written as a GGUF file with gguf-py, the way llama.cpp's converter writes one:
F32 tensors under GGUF names, q/k rows permuted for its RoPE layout, a byte-level BPE in the file's
metadata with ChatML specials (ids 0-2 as SmolLM2 has them) and a chat template."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["the capital of france is paris.", "write a short poem about the sea.", "what is two plus two? four.",
        "hello there, how are you today?", "the quick brown fox jumps over the lazy dog."] * 20


def _bpe() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    import json
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [t for t, _ in vocab], [" ".join(m) if isinstance(m, list) else m for m in merges]


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, eos_id: int = 2, architecture: str = "llama") -> torch.nn.Module:
    """Write the GGUF file; returns the HF model it holds (for comparing logits)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens, merges = _bpe()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=eos_id)
    model = LlamaForCausalLM(config).eval()
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_name("tiny-llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(16)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(eos_id)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(2):
        p = f"model.layers.{i}."
        names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
        for hf, gg in names.items():
            t = state[p + hf + ".weight"]
            if hf == "self_attn.q_proj":
                t = _permute(t, 4)
            elif hf == "self_attn.k_proj":
                t = _permute(t, 2)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model
