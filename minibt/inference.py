"""Which engine runs a recipe's inference (`inference.engine`), and that engine's life in a run.

hf: the run's own engine (the training base, minibt's decode loop). vllm: a vLLM engine of its own
(minibt/engine/vllm.py), started when the first inference stage asks for it and, on a GPU, stopped
before each training stage so that training gets the GPU's memory back; on a CPU it stays up (its
start costs ~25 s and the memory is the machine's). Every start and stop is recorded in the manifest
(`inference_engines`: seconds, memory), and every inference stage's counts carry `engine`.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minibt.engine.interface import Inference
    from minibt.engine.vllm import VllmEngine

log = logging.getLogger("minibt")


def choose(cfg: Any) -> tuple[str, str]:
    """(engine, why) for an inference section: what `auto` picks and the reason, for --dry-run and the manifest."""
    from minibt.engine.load import has_gpu

    if cfg.engine != "auto":
        return cfg.engine, f"inference.engine is {cfg.engine}"
    if cfg.workers > 1:
        return "hf", "auto: inference.workers > 1 spreads the HF engine over Ray workers"
    if importlib.util.find_spec("vllm") is None:
        return "hf", "auto: vllm is not installed (pip install 'minibt[vllm]')"
    if not has_gpu():
        return "hf", "auto: no GPU (on a CPU the HF engine is the faster one for small models; inference.engine=vllm uses vLLM's CPU build)"
    return "vllm", "auto: vllm is installed and a GPU is present"


def start_vllm(recipe: Any, model_cfg: Any) -> VllmEngine:
    from minibt.engine.vllm import VllmEngine

    return VllmEngine.start(model_cfg, recipe.lora, recipe.inference, seed=recipe.run.seed)


def open_inference(recipe: Any, recorded: str | None = None) -> Inference:
    """The inference engine of a finished or running run, for minibt generate/chat/eval and the Python API."""
    from minibt.base_model import model_of, open_engine

    engine, why = choose(recipe.inference)
    log.info("inference engine: %s (%s)", engine, why)
    if engine == "vllm":
        return start_vllm(recipe, model_of(recipe, recorded))
    return open_engine(recipe, recorded).infer


class RunInference:
    """A run's inference engine: the run's HF engine itself, or a vLLM engine started on first use."""

    def __init__(self, rd: Any, recipe: Any, hf: Callable[[], Inference]):
        self.rd, self.recipe, self.hf = rd, recipe, hf
        self._choice: tuple[str, str] | None = None  # (engine, why), chosen when first asked
        self._vllm: VllmEngine | None = None

    @property
    def separate(self) -> bool:
        """Whether inference runs on an engine of its own (vLLM) rather than the training engine."""
        if self._choice is None:
            self._choice = choose(self.recipe.inference)
        return self._choice[0] == "vllm"

    def engine(self) -> Inference:
        if not self.separate:
            return self.hf()
        if self._vllm is None:
            assert self._choice is not None  # chosen by self.separate above
            self.rd.note(inference=dict(zip(("engine", "why"), self._choice)))
            from minibt.base_model import model_of

            self._vllm = start_vllm(self.recipe, model_of(self.recipe, self.rd.manifest.get("base_model")))
            self.rd.note_engine_started({"engine": "vllm", "started": _now(), **self._vllm.started})
        return self._vllm

    def before_training(self, adapter: str) -> None:
        """A training stage is next: `adapter` is retrained (served afresh when next asked for); on a GPU
        vLLM is stopped so that training has the GPU's memory."""
        if self._vllm is None:
            return
        self._vllm.delete_adapter(adapter)
        from minibt.engine.load import has_gpu

        if has_gpu():
            self.close()

    def close(self) -> None:
        if self._vllm is None:
            return
        seconds = self._vllm.close()
        self._vllm = None
        self.rd.note_engine_stopped(stopped=_now(), stop_seconds=seconds)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
