"""Open a run for inference: the base loaded once, the run's adapters attached, switch by name.

    import minibt
    s = minibt.open_run("runs/toy")
    s.generate(["What is the capital of Zorbia?"], adapter="m1")
    s.generate(["..."], adapter="m0")              # switching is set_adapter, not a reload
    s.backtranslate(["Some web text."])            # myx writes the instruction
    s.score("instruction", "output", adapter="m0") # the run's curator score, and whether it is kept

Answer lengths default to what fits the run (`answer_tokens`, `instruction_tokens`), and the engine
never cuts a prompt to make room for generation that does not fit (engine.generation_budget).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

from minibt import io
from minibt.engine import BASE, MIN_NEW_TOKENS, import_backend
from minibt.engine.interface import Inference
from minibt.errors import MinibtError
from minibt.inference import open_inference
from minibt.roles import MYX, backward_prompt, forward_prompt, keeps, round_threshold, score_pairs
from minibt.rundir import RunDir


class Session:
    def __init__(self, path: str | Path, adapters: Iterable[str] | None = None,
                 engine: Literal["auto", "hf", "vllm"] | None = None):
        self.run = RunDir.open(path)
        self.recipe = self.run.recipe()
        if engine is not None:  # the caller's choice over the recipe's inference.engine (minibt serve --engine)
            self.recipe = dataclasses.replace(self.recipe, inference=dataclasses.replace(self.recipe.inference, engine=engine))
        import_backend(self.recipe.model.backend)
        # the engine the recipe's inference section picks (minibt/inference.py): the HF engine, or vLLM
        self.engine: Inference = open_inference(self.recipe, self.run.manifest.get("base_model"))
        wanted = list(adapters) if adapters is not None else self.run.adapter_names()
        for name in wanted:
            self.attach(name)

    @property
    def adapters(self) -> list[str]:
        return self.engine.adapters

    def attach(self, name: str) -> None:
        if name == BASE or name in self.engine.adapters:
            return
        if not (self.run.adapter(name) / "adapter_config.json").exists():
            have = ", ".join(self.run.adapter_names()) or "none yet"
            raise MinibtError(f"adapter {name!r} does not exist in {self.run.path} (have: {have}; 'base' means no adapter)")
        self.run.check_adapter(name)  # its weights are there, as saved
        self.engine.load_adapter(name, self.run.adapter(name))

    @functools.cached_property
    def answer_tokens(self) -> int:
        """Default answer length: 1.5x the run's longest seed answer (EOS included), within half the context."""
        return answer_tokens(self.run, self.recipe, self.engine.text.count_tokens)

    @property
    def instruction_tokens(self) -> int:
        """Default instruction length for myx: the recipe's augmentation budget."""
        return self.recipe.augment.max_new_tokens

    def prompt(self, instruction: str) -> str:
        """The rendered forward prompt, with the seed tag as the paper uses at inference."""
        return forward_prompt(self.engine.text, self.recipe, instruction)

    def generate(self, instructions: list[str] | str, adapter: str = "m1", max_new_tokens: int | None = None,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
        """Answers to `instructions` (default length: `answer_tokens`)."""
        self.attach(adapter)
        if isinstance(instructions, str):
            instructions = [instructions]
        max_new_tokens = max_new_tokens or self.answer_tokens
        return self.engine.generate(adapter, [self.prompt(i) for i in instructions], max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, batch_size=batch_size)

    def stream(self, messages: list[dict[str, str]], adapter: str, max_new_tokens: int | None = None,
               temperature: float = 0.0, top_p: float = 1.0, on_text=print) -> str:
        """One chat reply to `messages` (user/assistant turns), streamed to `on_text`."""
        self.attach(adapter)
        max_new_tokens = max_new_tokens or self.answer_tokens
        return self.engine.stream(adapter, self.chat_prompt(messages), max_new_tokens, temperature, top_p, on_text)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """The rendered prompt of a chat: with `forward.tags`, the seed tag as its system prompt."""
        cfg = self.recipe.forward
        system = [{"role": "system", "content": cfg.seed_tag}] if cfg.tags else []
        return self.engine.text.render(system + messages)

    def backtranslate(self, texts: list[str] | str, adapter: str = MYX, max_new_tokens: int | None = None,
                      temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
        """The instruction each text answers, written by the backward model (default length: `instruction_tokens`)."""
        self.attach(adapter)
        max_new_tokens = max_new_tokens or self.instruction_tokens
        if isinstance(texts, str):
            texts = [texts]
        return self.engine.generate(adapter, [backward_prompt(self.engine.text, t, max_new_tokens) for t in texts],
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)

    def score(self, instructions: list[str] | str, outputs: list[str] | str, adapter: str = "m0") -> Any:
        """The curator's score for each (instruction, output) pair, by the run's own curation method
        (`curate.method`/`mode`), with the method's details and `kept`: whether the run's threshold for
        the round this adapter curates (m0 -> round 1) keeps it. One pair gives a dict, lists a list."""
        self.attach(adapter)
        single = isinstance(instructions, str)
        pairs = [{"instruction": i, "output": o} for i, o in zip([instructions] if single else instructions,
                                                                  [outputs] if single else outputs)]
        threshold = self._threshold(adapter)
        scored = [{k: v for k, v in r.items() if k not in ("instruction", "output")}
                  for r in score_pairs(self.engine, self.recipe, adapter, pairs)]
        for r in scored:
            r["kept"] = keeps(r["score"], threshold)
        return scored[0] if single else scored

    def _threshold(self, curator: str) -> float:
        """The threshold of the round `curator` curated: m0 curates round 1, m_k round k + 1."""
        return round_threshold(self.run, self.recipe, int(curator[1:]) + 1 if curator[1:].isdigit() else 1)


def answer_tokens(run: RunDir, recipe: Any, count_tokens: Callable[[str], int]) -> int:
    """`Session.answer_tokens` from a tokenizer's count alone (minibt serve on vLLM loads no engine here)."""
    seed = run.data("seed")
    outputs = [r["output"] for r in io.read_jsonl(seed)] if seed.is_file() else []
    half = max(MIN_NEW_TOKENS, recipe.model.max_length // 2)
    if not outputs:
        return half
    longest = max(count_tokens(o) for o in outputs) + 1
    return min(half, max(MIN_NEW_TOKENS, math.ceil(1.5 * longest)))


def open_run(path: str | Path, adapters: Iterable[str] | None = None,
             engine: Literal["auto", "hf", "vllm"] | None = None) -> Session:
    return Session(path, adapters, engine)
