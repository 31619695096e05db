"""Open a run for inference: the base loaded once, the run's adapters attached, switch by name.

    import minibt
    s = minibt.open_run("runs/toy")
    s.generate(["What is the capital of Zorbia?"], adapter="m1")
    s.generate(["..."], adapter="m0")              # switching is set_adapter, not a reload
    s.backtranslate(["Some web text."])            # myx writes the instruction
    s.score("instruction", "output", adapter="m0") # the rubric's digit distribution
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from minibt import prompts
from minibt.engine import BASE, Engine, import_backend
from minibt.errors import MinibtError
from minibt.rundir import RunDir
from minibt.stages.backward import MYX, backward_prompt
from minibt.stages.curate import RUBRIC_ANSWER_ROOM, rubric_prompt
from minibt.stages.forward import forward_prompt


class Session:
    def __init__(self, path: str | Path, adapters: Iterable[str] | None = None):
        from minibt.pipeline import open_engine

        self.run = RunDir.open(path)
        self.recipe = self.run.recipe()
        import_backend(self.recipe.model.backend)
        self.engine: Engine = open_engine(self.recipe, self.run.manifest.get("base_model"))
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
        self.engine.load_adapter(name, self.run.adapter(name))

    def prompt(self, instruction: str) -> str:
        """The rendered forward prompt, with the seed tag as the paper uses at inference."""
        return forward_prompt(self.engine, self.recipe, instruction)

    def generate(self, instructions: list[str] | str, adapter: str = "m1", max_new_tokens: int = 256,
                 temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
        self.attach(adapter)
        if isinstance(instructions, str):
            instructions = [instructions]
        return self.engine.generate(adapter, [self.prompt(i) for i in instructions], max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, batch_size=batch_size)

    def stream(self, messages: list[dict[str, str]], adapter: str, max_new_tokens: int = 256, temperature: float = 0.7,
               top_p: float = 0.9, on_text=print) -> str:
        """One chat reply to `messages` (user/assistant turns), streamed to `on_text`."""
        self.attach(adapter)
        cfg = self.recipe.forward
        system = [{"role": "system", "content": cfg.seed_tag}] if cfg.tags else []
        prompt = self.engine.render(system + messages)
        return self.engine.stream(adapter, prompt, max_new_tokens, temperature, top_p, on_text)

    def backtranslate(self, texts: list[str] | str, adapter: str = MYX, max_new_tokens: int = 64,
                      temperature: float = 0.0, top_p: float = 1.0, batch_size: int = 8) -> list[str]:
        """The instruction each text answers, written by the backward model."""
        self.attach(adapter)
        if isinstance(texts, str):
            texts = [texts]
        return self.engine.generate(adapter, [backward_prompt(self.engine, t, max_new_tokens) for t in texts],
                                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, batch_size=batch_size)

    def score(self, instruction: str, output: str, adapter: str = "m0") -> dict[str, Any]:
        """The curator's rubric score for one pair: digit probabilities, expected score, argmax."""
        self.attach(adapter)
        probs, mass = self.engine.next_token_probs(
            adapter, [rubric_prompt(self.engine, instruction, output, RUBRIC_ANSWER_ROOM)],
            prompts.SCORE_PREFIX, prompts.SCORE_CHOICES)
        p = probs[0]
        return {"probs": [float(x) for x in p], "expected": float(p @ np.arange(1, 6)), "argmax": int(p.argmax()) + 1,
                "mass": float(mass[0])}


def open_run(path: str | Path, adapters: Iterable[str] | None = None) -> Session:
    return Session(path, adapters)
