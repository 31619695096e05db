"""Shared fixtures: a tiny Llama with a locally trained tokenizer, built once per test session."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # two threads collapse throughput on 2-core VMs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the a of is what who where when which how color capital river mountain city king queen "
    "answer question score good bad text write instruction assistant user system tell me about "
    "red blue green yellow north south east west one two three four five small large old new"
).split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "." for _ in range(n)]


def build_tiny_model(path, vocab_size: int = 384, hidden: int = 64, layers: int = 2) -> str:
    """Save a random-weight tiny Llama and a byte-level BPE tokenizer to `path` (safetensors)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from minibt.prompts import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tiny_corpus() + ["### System:\n### User:\n### Assistant:\nScore: 1 2 3 4 5"], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=fast.vocab_size if hasattr(fast, "vocab_size") else len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


# --- one tiny finished run, shared by test_report, test_eval and test_export -------------------

FINISHED_SEED = [
    {"instruction": f"What is the color of the {thing}?", "output": f"The {thing} is {color}."}
    for thing, color in [("king", "red"), ("queen", "blue"), ("river", "green"), ("city", "yellow")] * 2
]
# two passages the corpus filters drop: a duplicate and one too short
FINISHED_CORPUS = [{"text": f"The {t} of the {p} is {c}."} for t in ("color", "capital") for p in ("north", "south") for c in ("red", "blue")]
FINISHED_CORPUS += [{"text": FINISHED_CORPUS[0]["text"]}, {"text": "Red."}]


def _finished_recipe(model_dir: str) -> str:
    train = "{max_steps: 2, batch_size: 4, learning_rate: 1.0e-3}"
    return f"""
run: {{name: tiny, seed: 0}}
model: {{name: {model_dir}, backend: transformers, quantization: nf4, max_length: 1024, device: cpu}}
lora: {{r: 4, alpha: 8}}
seed: {{path: seed.jsonl}}
corpus: {{path: corpus.jsonl, min_chars: 10}}
backward: {train}
augment: {{max_new_tokens: 6, batch_size: 8, shard_size: 8}}
curate: {{threshold: 2.0, batch_size: 8, shard_size: 8}}
forward: {{max_steps: 2, batch_size: 4, learning_rate: 1.0e-3, rounds: 1}}
"""


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """(root, run directory, `minibt run` output) of one tiny run: myx, m0, curate_r1, m1.
    Shared by test_report, test_eval and test_export; its corpus loses two passages to the filters."""
    from click.testing import CliRunner

    from minibt import io
    from minibt.cli import main

    root = tmp_path_factory.mktemp("finished")
    io.write_jsonl(root / "seed.jsonl", FINISHED_SEED)
    io.write_jsonl(root / "corpus.jsonl", FINISHED_CORPUS)
    (root / "tiny.yaml").write_text(_finished_recipe(tiny_model_dir))
    result = CliRunner().invoke(main, ["run", str(root / "tiny.yaml"), "--out", str(root / "run")])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return root, root / "run", result.output
