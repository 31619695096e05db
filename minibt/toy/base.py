"""The toy world's base model: a byte-level BPE tokenizer and a tiny Llama pretrained on the world's
raw text, saved as an ordinary transformers folder and cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from minibt import io, prompts
from minibt.toy.world import World, WorldConfig

log = logging.getLogger("minibt.toy")

# Bump when the tokenizer, model or training loop changes, so old cached bases are not reused.
BASE_FORMAT = 1
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
MAX_POSITIONS = 1024  # RoPE has no position weights: room for the rubric prompt costs nothing


def build_base(cfg: WorldConfig, world: World, cache_dir: Path | None = None) -> Path:
    """The folder of the pretrained toy base (model + tokenizer), built once per world and config."""
    final = Path(cache_dir or io.cache_dir()) / "toy-base" / _cache_key(cfg, world)
    if final.is_dir():
        return final

    def build(tmp: Path) -> None:
        tokenizer = train_tokenizer(cfg, world)
        tokenizer.save_pretrained(tmp)
        pretrain(cfg, world, tokenizer).save_pretrained(tmp)

    io.built_folder(final, build)
    log.info("toy base saved to %s", final)
    return final


def train_tokenizer(cfg: WorldConfig, world: World):
    """A byte-level BPE trained on the world's text and minibt's fixed prompts, with the chat template.

    The prompts (rubric, backward instruction, tags) are in the training text only so that their
    words become tokens: otherwise the rubric prompt alone would be a thousand byte-sized tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_texts(world), trainer)
    # Every sequence starts with <s>, as in pretraining, so fine-tuned prompts look like documents.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=prompts.CHAT_TEMPLATE,
    )


def _tokenizer_texts(world: World) -> list[str]:
    fixed = [prompts.RUBRIC, prompts.BACKWARD_SYSTEM, prompts.SCORE_PREFIX + " 1 2 3 4 5"]
    fixed += ["### System:\n### User:\n### Assistant:\n", "Answer in the style of an AI Assistant."]
    fixed += ["Answer with knowledge from web search."]
    pairs = [p["instruction"] + "\n" + p["output"] for p in world.seed_pairs]
    # Repeated so that BPE merges their words as it merges the world's frequent words: the rubric
    # prompt then takes ~520 tokens (~800 with 20 repeats); more repeats gain nothing.
    return world.pretrain_texts + pairs + [row["text"] for row in world.corpus] + fixed * 100


def pretrain(cfg: WorldConfig, world: World, tokenizer):
    """A tiny Llama trained from scratch on world.pretrain_texts (random crops of the token stream)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads collapse throughput on small VMs
    try:
        with torch.random.fork_rng():  # seed model init without touching the caller's RNG
            torch.manual_seed(cfg.seed)
            config = LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.hidden_size * 8 // 3,
                num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads,
                num_key_value_heads=cfg.heads,
                max_position_embeddings=MAX_POSITIONS,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                tie_word_embeddings=True,
            )
            model = LlamaForCausalLM(config)
            _train(cfg, model, _token_stream(world.pretrain_texts, tokenizer))
    finally:
        torch.set_num_threads(threads)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _token_stream(texts: list[str], tokenizer) -> torch.Tensor:
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]  # each starts with <s>
    return torch.tensor([t for doc in ids for t in doc + [tokenizer.eos_token_id]])


def _train(cfg: WorldConfig, model, stream: torch.Tensor) -> None:
    steps, batch, length = cfg.pretrain_steps, cfg.pretrain_batch, cfg.pretrain_seq_len
    params = sum(p.numel() for p in model.parameters())
    log.info("pretraining toy base: %d params, %d tokens, %d steps of %dx%d", params, len(stream), steps, batch, length)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps)))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    offsets = torch.arange(length)
    model.train()
    start = time.monotonic()
    for step in range(1, steps + 1):
        # random crops of the document stream: every step sees new boundaries and neighbours
        starts = torch.randint(0, len(stream) - length, (batch, 1), generator=gen)
        x = stream[starts + offsets]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps:
            log.info("pretrain step %d/%d loss %.3f (%.0f s)", step, steps, loss.item(), time.monotonic() - start)


def _cache_key(cfg: WorldConfig, world: World) -> str:
    """A hash of the config and of the text the base learns from, so a changed generator rebuilds."""
    h = hashlib.sha256(json.dumps([BASE_FORMAT, dataclasses.asdict(cfg)], sort_keys=True).encode())
    for text in _tokenizer_texts(world):
        h.update(text.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
