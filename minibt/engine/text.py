"""The text rules every inference engine follows on a base's tokenizer: rendering chat prompts, counting and
clipping texts, fitting prompts into the context with a generation budget, and the token ids a score is read
from. The HF engine and the vLLM engine each hold one `TextRules`, so both see the same token ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from minibt.engine.batching import generation_budget
from minibt.errors import MinibtError

log = logging.getLogger("minibt.engine")


class TextRules:
    """Texts and token ids for a model of `max_length` tokens; `truncated` counts the texts and prompts cut to
    fit, over the rules' life."""

    def __init__(self, tokenizer: Any, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        self.truncated = 0

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def clip(self, text: str, max_tokens: int) -> tuple[str, bool]:
        """(`text` cut to at most `max_tokens` tokens, whether it was cut); a cut is counted in `truncated`."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text, False
        self.truncated += 1
        return self.tokenizer.decode(ids[:max_tokens]), True

    def clip_text(self, text: str, max_tokens: int) -> str:
        return self.clip(text, max_tokens)[0]

    def encode(self, prompts: Sequence[str], room: int) -> list[list[int]]:
        """Token ids per prompt, left-truncated to leave `room` tokens for what comes after."""
        limit = max(1, self.max_length - room)
        out = []
        for ids in self.tokenizer(list(prompts))["input_ids"]:
            if len(ids) > limit:
                self.truncated += 1
                ids = ids[-limit:]
            out.append(ids)
        return out

    def fit(self, prompts: Sequence[str], max_new_tokens: int) -> tuple[list[list[int]], list[int]]:
        """Token ids and a generation budget per prompt (`generation_budget`); clipped prompts are
        counted in `truncated` and reported in one warning line."""
        encoded, budgets, clipped = [], [], 0
        for ids in self.tokenizer(list(prompts))["input_ids"]:
            keep, new = generation_budget(len(ids), max_new_tokens, self.max_length)
            if keep < len(ids):
                clipped += 1
                ids = ids[-keep:]  # the end holds the question and the assistant's turn
            encoded.append(ids)
            budgets.append(new)
        if clipped:
            self.truncated += clipped
            log.warning("%d of %d prompts were longer than model.max_length=%d leaves room for: kept the last "
                        "tokens of each, %d new tokens at most", clipped, len(encoded), self.max_length, min(budgets))
        return encoded, budgets

    # --- scoring -------------------------------------------------------------------------

    def choice_ids(self, prefix: str, choices: Sequence[str]) -> list[int]:
        """The token id of each choice as it follows "<prefix> " in running text.

        Byte-level BPEs write " 3" as one token; Llama-3 and SentencePiece split off the space. Either
        way, "<prompt><prefix> <choice>" minus its last token is the prompt, and the last is the choice.
        """
        seqs = [self.tokenizer(f"x\n{prefix} {c}", add_special_tokens=False)["input_ids"] for c in choices]
        for c, seq in zip(choices, seqs):
            if self.tokenizer.decode(seq[-1:]).strip() != c or seq[:-1] != seqs[0][:-1]:
                raise MinibtError(f"the tokenizer does not write score {c!r} as one token after {prefix!r}; use curate.mode=generate")
        return [seq[-1] for seq in seqs]

    def choice_prompts(self, prompts: Sequence[str], prefix: str, choices: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """(each choice's token id, each prompt's ids up to the position a choice is read at)."""
        ids = self.choice_ids(prefix, choices)
        return ids, [e[:-1] for e in self.encode([f"{p}{prefix} {choices[0]}" for p in prompts], room=0)]

    def completion_sequences(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt + completion ids, the completion ids: EOS included) per pair; a prompt is clipped from its start
        to leave its completion room, and an empty one becomes BOS (else EOS) so the first token has a context."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        comp = [(tok(c, add_special_tokens=False)["input_ids"] + eos)[: self.max_length - 1] for c in completions]
        start = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        return [(self.encode([p], room=len(c))[0] or start) + c for p, c in zip(prompts, comp)], comp


def renormalised(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the choices' probabilities renormalised over the choices, [n, k]; the raw mass they got, [n])."""
    mass = probs.sum(axis=1)
    return probs / np.maximum(mass[:, None], 1e-12), mass
