"""What `model.max_length` holds: the dry run's check that every stage's prompt and answer fit.

Token counts come from the model's tokenizer when it is on this machine (a local folder or the
Hugging Face cache); otherwise from ~4 characters a token, marked "~". Nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from minibt import prompts
from minibt.prompts import CHAT_TEMPLATE
from minibt.recipe import Recipe
from minibt.roles import RUBRIC_ANSWER_ROOM

CHARS_PER_TOKEN = 4  # English text with a modern BPE, for when the tokenizer is not at hand


def _counter(recipe: Recipe) -> tuple[Callable[[prompts.Messages], int], bool]:
    """(count the tokens of messages rendered as a generation prompt, exact?)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(recipe.model.name, revision=recipe.model.revision, local_files_only=True,
                                            trust_remote_code=recipe.model.trust_remote_code)
        if recipe.model.chat_template == "minibt" or not tok.chat_template:  # as the engine loads it
            tok.chat_template = CHAT_TEMPLATE

        def count(messages: prompts.Messages) -> int:
            return len(tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))["input_ids"])

        return count, True
    except Exception:  # not on this machine (or no model.name yet): estimate from characters
        return lambda messages: math.ceil(sum(len(m["content"]) + 16 for m in messages) / CHARS_PER_TOKEN), False


def fit_notes(recipe: Recipe) -> list[str]:
    """One line for each stage whose prompt plus answer does not fit in model.max_length."""
    if not recipe.model.name:
        return []
    count, exact = _counter(recipe)
    about = "" if exact else "~"
    context = recipe.model.max_length
    passage = recipe.corpus.min_chars or 200  # the shortest passage the corpus filters keep
    passage_tokens = math.ceil(passage / CHARS_PER_TOKEN)
    notes: list[str] = []

    backward = count(prompts.backward_messages(""))
    if backward + recipe.augment.max_new_tokens + 16 > context:
        notes.append(f"model.max_length={context} cannot hold myx's prompt ({about}{backward} tokens without its text) "
                     f"plus augment.max_new_tokens={recipe.augment.max_new_tokens}: texts will be cut to almost nothing")
    cfg = recipe.curate
    if cfg.method == "rubric":
        rubric = count(prompts.rubric_messages("", ""))
        answer = cfg.reasoning_tokens if cfg.mode == "generate" else RUBRIC_ANSWER_ROOM
        room = context - rubric - answer
        what = f"curate.reasoning_tokens={cfg.reasoning_tokens}" if cfg.mode == "generate" else "the score"
        if room < recipe.augment.max_new_tokens + passage_tokens:
            notes.append(f"model.max_length={context} holds the paper's rubric ({about}{rubric} tokens) and {what} "
                         f"with room for {max(0, room)} tokens of instruction and output: a {passage}-character "
                         f"passage (~{passage_tokens} tokens) with its instruction does not fit and will be cut "
                         f"('truncated_for_rubric'); raise model.max_length")
    return notes


def describe(recipe: Recipe) -> str | None:
    notes = fit_notes(recipe)
    return "context (model.max_length):\n" + "\n".join(f"  warning: {n}" for n in notes) if notes else None
