"""Peak memory of a recipe, per stage, estimated from the model's shape: no weights are loaded. On a GPU
the peak allocation; for a recipe with model.device=cpu the process's peak resident memory (RSS).

The shape comes from, in order: a world's config (minibt/worlds.py: the toy world's); the model's `config.json`
(a local folder, the Hugging Face cache, or one quick download of that one file); a small table of
known shapes matched by model name (offline). Failing all three the estimate says it is unavailable
rather than guessing.

What is counted, in bytes (c = 2 for 16-bit compute, 4 for float32, which dtype auto is on a CPU;
T = batch x model.max_length):
  weights      4-bit NF4 linear layers: 0.5 byte/param + quantization constants (double quant:
               one 8-bit absmax per 64 weights, one fp32 constant per 256 absmaxes); embeddings,
               lm_head and norms stay in 16-bit (c). quantization=none: every parameter at c bytes.
  lora         every adapter on the base so far (myx, m0, m1...): 4 bytes/param (fp32); the one in
               training also holds its gradient and Adam's two moments: +12 bytes/param. Inference on a
               float32 base runs the adapter folded into copies of the weights it adapts (+4 bytes each).
  activations  training: per layer and token about 4h + 3q + 3kv + 4i values (norm inputs and
               outputs, q/k/v before and after RoPE, attention output, the MLP's gate/up/act/product);
               with gradient checkpointing (GPU only: training on a CPU runs without it) only each
               layer's input (h) is kept, plus one layer recomputed. Inference (no autograd): per
               token 2h + 3i values (residual, normed input, the MLP's gate, up and activation) of the
               one layer being computed.
  logits       training: T x vocab x (c + 8): the logits, their fp32 copy for the loss, and the fp32
               log-softmax (the transformers loss; unsloth's fused loss needs far less). On a CPU,
               measured: trl's chunked loss holds min(T, 256) x vocab x (c + 8), and the activations
               are CPU_ACTIVATION_FACTOR x the saved-tensor count (the peak RSS of the backward pass).
               Likelihood curation: the same without a gradient. Rubric scoring and generation: the
               last position only (batch x vocab x (c + 4)).
  kv_cache     2 x layers x kv x batch x model.max_length x c.
  overhead     GPU: 0.5 GiB for the CUDA context, cuBLAS workspace and allocator slack. CPU: the Python
               runtime with torch, transformers, trl and datasets imported (measured RSS before a model).
  vllm         inference stages on vLLM (inference.engine, minibt/inference.py): its own engine beside the
               training base (weights and adapters stay): inference.gpu_memory_utilization of the GPU
               when one is visible; else its weights, max_loras adapter slots, the KV cache (inference.
               kv_cache_gib, or max_num_seqs sequences of model.max_length) and 1 GiB for activations.

Every batch is counted padded to model.max_length, the worst case. Small terms (< 1 %) are left out.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minibt.recipe import Recipe
from minibt.worlds import world_of

GiB = 1024**3
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # codes + 8-bit absmax per 64 + fp32 per 256 absmaxes
LORA_BYTES = 4  # an adapter's fp32 weights
LORA_TRAIN_EXTRA_BYTES = 12  # its gradient (4) and Adam's two moments (8), while it trains
LOSS_EXTRA_BYTES = 8  # fp32 copy of the logits + fp32 log-softmax, per logit, in training
OVERHEAD = GiB // 2  # CUDA context, cuBLAS workspace, allocator slack
CPU_RUNTIME = 700 * 2**20  # RSS of the Python runtime with minibt's libraries imported (bench/real/memory.py)
# CPU training: peak RSS over the saved-tensor count, measured on SmolLM2-135M at 256-768 tokens a batch
# (bench/real/memory.py): autograd's transients in the backward pass and blocks the allocator keeps
CPU_ACTIVATION_FACTOR = 1.6
LOSS_CHUNK = 256  # trl's default loss (chunked_nll) computes the lm_head on this many completion tokens at a time
CONFIG_TIMEOUT_S = 5.0  # one try at fetching config.json; offline, the known shapes answer


@dataclass(frozen=True)
class Shape:
    """A Llama-style decoder: what the estimate needs of a model config."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def modules(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def linear_params(self) -> int:
        """Parameters of the decoder layers' linear layers: what 4-bit quantization applies to."""
        return self.layers * sum(a * b for a, b in self.modules().values())

    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied), norms and biases: kept in 16-bit."""
        bias = self.layers * (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden + bias

    def params(self) -> int:
        return self.linear_params() + self.other_params()

    def lora_params(self, r: int, targets: list[str]) -> int:
        dims = self.modules()
        return self.layers * sum(r * (dims[t][0] + dims[t][1]) for t in targets if t in dims)

    def adapted_params(self, targets: list[str]) -> int:
        """Parameters of the linear layers a LoRA with these target modules adapts."""
        dims = self.modules()
        return self.layers * sum(dims[t][0] * dims[t][1] for t in targets if t in dims)

    def act_per_token_layer(self) -> int:
        """Values saved per token and decoder layer for the backward pass (see the module docstring)."""
        return 4 * self.hidden + 3 * self.q_dim + 3 * self.kv_dim + 4 * self.intermediate

    def inference_per_token_layer(self) -> int:
        """Values alive at once per token inside one layer without autograd: residual, normed input, MLP."""
        return 2 * self.hidden + 3 * self.intermediate


def _llama(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv: int, head_dim: int = 0,
           tied: bool = False, qkv_bias: bool = False) -> Shape:
    return Shape(vocab, hidden, intermediate, layers, heads, kv, head_dim or hidden // heads, tied, qkv_bias)


# Offline fallback: published configs of common bases (the 4-bit repos share their shapes), matched
# against the lowercased model name; the first match wins.
KNOWN_SHAPES: list[tuple[str, str, Shape]] = [
    (r"smollm2-135m", "SmolLM2-135M", _llama(49152, 576, 1536, 30, 9, 3, 64, tied=True)),
    (r"llama-3\.2-1b", "Llama-3.2-1B", _llama(128256, 2048, 8192, 16, 32, 8, 64, tied=True)),
    (r"llama-3\.2-3b", "Llama-3.2-3B", _llama(128256, 3072, 8192, 28, 24, 8, 128, tied=True)),
    (r"llama-3(\.1)?-8b", "Llama-3.1-8B", _llama(128256, 4096, 14336, 32, 32, 8)),
    (r"qwen2\.5-0\.5b", "Qwen2.5-0.5B", _llama(151936, 896, 4864, 24, 14, 2, tied=True, qkv_bias=True)),
    (r"qwen2\.5-1\.5b", "Qwen2.5-1.5B", _llama(151936, 1536, 8960, 28, 12, 2, tied=True, qkv_bias=True)),
    (r"qwen2\.5-3b", "Qwen2.5-3B", _llama(151936, 2048, 11008, 36, 16, 2, tied=True, qkv_bias=True)),
    (r"qwen2\.5-7b", "Qwen2.5-7B", _llama(152064, 3584, 18944, 28, 28, 4, qkv_bias=True)),
    (r"mistral-7b", "Mistral-7B", _llama(32768, 4096, 14336, 32, 32, 8)),
]


def known_shape(name: str) -> tuple[str, Shape] | None:
    low = name.lower()
    for pattern, label, shape in KNOWN_SHAPES:
        if re.search(pattern, low):
            return label, shape
    return None


def shape_from_config(cfg: Any) -> Shape:
    """The Shape of a transformers config (object or dict); ValueError when it is not Llama-style."""
    get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    text = get("text_config")
    if text is not None and get("hidden_size") is None:  # multimodal wrappers keep the LM in text_config
        return shape_from_config(text)
    if (get("num_local_experts") or get("num_experts") or 0) > 1:
        raise ValueError("mixture-of-experts shapes are not estimated")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if not isinstance(get(k), int)]
    if missing:
        raise ValueError(f"config has no {missing[0]}")
    heads = get("num_attention_heads")
    return Shape(
        vocab=get("vocab_size"),
        hidden=get("hidden_size"),
        intermediate=get("intermediate_size"),
        layers=get("num_hidden_layers"),
        heads=heads,
        kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or get("hidden_size") // heads,
        tied=bool(get("tie_word_embeddings", False)),
        qkv_bias=bool(get("attention_bias", get("model_type") == "qwen2")),
    )


# --- finding the config without loading the model -------------------------------------------


def _download_config(name: str, revision: str | None) -> dict[str, Any]:
    """config.json from the hub: one request with a short timeout, no retries (offline is common)."""
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(name, "config.json", revision=revision)
    response = get_session().get(url, headers=build_hf_headers(), timeout=CONFIG_TIMEOUT_S, follow_redirects=True)
    response.raise_for_status()
    return response.json()


def load_config(name: str, revision: str | None = None) -> dict[str, Any] | None:
    """The model's config.json as a dict (local folder, HF cache, or the hub), or None if out of reach."""
    folder = Path(name).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json", revision=revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8"))
        if constants.is_offline_mode():
            return None
        return _download_config(name, revision)
    except Exception:  # no network, unknown or gated repo, bad JSON: the known shapes answer instead
        return None


def _with_defaults(raw: dict[str, Any]) -> Any:
    """transformers' config class for the model type fills the keys config.json leaves out."""
    try:
        from transformers import AutoConfig

        kwargs = {k: v for k, v in raw.items() if k != "model_type"}
        return AutoConfig.for_model(raw["model_type"], **kwargs)
    except Exception:  # unknown model type (remote code): read the raw keys
        return raw


def find_shape(recipe: Recipe) -> tuple[Shape | None, str]:
    """(shape, where it came from) or (None, why there is none)."""
    world = world_of(recipe)
    if world is not None:
        return world.shape(recipe), f"from {world.title}'s config"
    name = recipe.model.name
    raw = load_config(name, recipe.model.revision)
    if raw is not None:
        try:
            return shape_from_config(_with_defaults(raw)), "from the model config"
        except ValueError as e:
            reason = f"the config is not a Llama-style decoder: {e}"
    else:
        reason = "the config could not be read: offline?"
    known = known_shape(name)
    if known is not None:
        return known[1], f"estimated from a known shape ({known[0]}; {reason})"
    return None, f"{reason}, and the name matches no known shape"


# --- the estimate ---------------------------------------------------------------------------


@dataclass
class StageMemory:
    stage: str
    parts: dict[str, int]  # bytes: weights, lora, activations, logits, kv_cache, overhead

    @property
    def total(self) -> int:
        return sum(self.parts.values())


@dataclass
class MemoryEstimate:
    model: str
    source: str  # where the shape came from, or why there is no estimate
    shape: Shape | None = None
    stages: list[StageMemory] = dataclasses.field(default_factory=list)
    lora_params: int = 0
    max_length: int = 0
    cpu: bool = False  # model.device=cpu: the figures are the process's RSS

    @property
    def peak(self) -> StageMemory | None:
        return max(self.stages, key=lambda s: s.total) if self.stages else None


def _compute_bytes(dtype: str, cpu: bool) -> int:
    return 4 if dtype == "float32" or (dtype == "auto" and cpu) else 2  # auto on a GPU: bf16, or fp16 on a T4


def weight_bytes(shape: Shape, quantization: str, c: int) -> int:
    if quantization == "nf4":
        return round(shape.linear_params() * NF4_BYTES_PER_PARAM) + shape.other_params() * c
    return shape.params() * c


def training_activation_bytes(shape: Shape, tokens: int, c: int, checkpointing: bool) -> int:
    layer = tokens * shape.act_per_token_layer() * c
    if checkpointing:
        return shape.layers * tokens * shape.hidden * c + layer
    return shape.layers * layer


def kv_cache_bytes(shape: Shape, batch: int, length: int, c: int) -> int:
    return 2 * shape.layers * shape.kv_dim * batch * length * c


def estimate_stages(recipe: Recipe, shape: Shape, stages: list[Any]) -> list[StageMemory]:
    """Peak memory of each stage in `stages` (minibt/stages/stage.py's Stage, as pipeline.stages declares them)."""
    from minibt.roles import MYX
    cpu = recipe.model.device == "cpu"
    m, c, length = recipe.model, _compute_bytes(recipe.model.dtype, cpu), recipe.model.max_length
    weights = weight_bytes(shape, m.quantization, c)
    lora = shape.lora_params(recipe.lora.r, recipe.lora.target_modules)
    from minibt.inference import choose

    vllm = vllm_bytes(recipe, shape, weights, lora, c) if choose(recipe.inference)[0] == "vllm" else 0
    # adapters.folded: inference on a float32 base holds folded copies of the adapted weights
    folded = shape.adapted_params(recipe.lora.target_modules) * 4 if m.quantization == "none" and c == 4 else 0
    out, adapters = [], 0
    for stage in stages:
        if stage.uses == "cpu":
            continue  # no model
        parts = {"weights": weights}
        if stage.adapter:
            adapters += 1
            cfg = recipe.backward if stage.adapter == MYX else recipe.forward
            tokens = cfg.batch_size * length
            parts["lora"] = adapters * lora * LORA_BYTES + lora * LORA_TRAIN_EXTRA_BYTES
            if cpu:
                parts["activations"] = round(training_activation_bytes(shape, tokens, c, False) * CPU_ACTIVATION_FACTOR)
                parts["logits"] = min(tokens, LOSS_CHUNK) * shape.vocab * (c + LOSS_EXTRA_BYTES)
            else:  # trl's chunked loss applies here too; unmeasured on a GPU, the full logits stay the worst case
                parts["activations"] = training_activation_bytes(shape, tokens, c, cfg.gradient_checkpointing)
                parts["logits"] = tokens * shape.vocab * (c + LOSS_EXTRA_BYTES)
            parts["kv_cache"] = 0
        else:
            parts["lora"] = adapters * lora * LORA_BYTES + (folded if adapters else 0)
            if stage.uses == "score":
                curate = recipe.curate
                batch = curate.batch_size
                if curate.method == "likelihood":  # full logits, their fp32 copy and log-softmax
                    logits = batch * length * shape.vocab * (c + LOSS_EXTRA_BYTES)
                else:  # distribution (one forward pass, logits_to_keep=1) or generate: the last position
                    logits = batch * shape.vocab * (c + 4)
            else:  # augment, evaluate: generation
                batch = stage.batch_size
                logits = batch * shape.vocab * (c + 4)
            parts["activations"] = batch * length * shape.inference_per_token_layer() * c
            parts["logits"] = logits
            parts["kv_cache"] = kv_cache_bytes(shape, batch, length, c)
        parts["overhead"] = CPU_RUNTIME if cpu else OVERHEAD
        if not stage.adapter and vllm:  # vLLM computes; the training base stays on the GPU
            parts.update(activations=0, logits=0, kv_cache=0, vllm=vllm)
        out.append(StageMemory(stage.name, parts))
    return out


def vllm_bytes(recipe: Recipe, shape: Shape, weights: int, lora: int, c: int) -> int:
    """What a vLLM engine holds on the GPU for this recipe (see the module's docstring)."""
    cfg = recipe.inference
    if cfg.kv_cache_gib is None:
        try:
            import torch

            if torch.cuda.is_available():
                return round(cfg.gpu_memory_utilization * torch.cuda.get_device_properties(0).total_memory)
        except ImportError:
            pass
    kv = round(cfg.kv_cache_gib * GiB) if cfg.kv_cache_gib is not None else kv_cache_bytes(
        shape, cfg.max_num_seqs, recipe.model.max_length, c)
    return weights + cfg.max_loras * lora * c + kv + GiB


def estimate(recipe: Recipe, stages: list[Any] | None = None) -> MemoryEstimate:
    """The memory estimate of a recipe. Reads at most the model's config.json; loads no weights."""
    from minibt.pipeline import stages as declared

    shape, source = find_shape(recipe)
    world = world_of(recipe)
    name = f"{world.title}'s base" if world is not None else recipe.model.name
    if shape is None:
        return MemoryEstimate(name, source)
    return MemoryEstimate(
        name, source, shape, estimate_stages(recipe, shape, stages if stages is not None else declared(recipe)),
        lora_params=shape.lora_params(recipe.lora.r, recipe.lora.target_modules), max_length=recipe.model.max_length,
        cpu=recipe.model.device == "cpu",
    )


COLUMNS = ("weights", "lora", "activations", "logits", "kv_cache")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def format_estimate(est: MemoryEstimate) -> str:
    """Lines for `minibt run --dry-run`, in GiB, labelled as an estimate."""
    if est.shape is None:
        return f"memory estimate: unavailable for {est.model}: {est.source}"
    gib = lambda b: f"{b / GiB:.2f}"  # noqa: E731
    lines = [
        f"memory estimate ({'peak RSS of the process' if est.cpu else 'peak GPU memory'} in GiB: an estimate from the model's"
        " shape, not a measurement)",
        f"  {est.model}: {_count(est.shape.params())} parameters, {est.source}",
        f"  LoRA: {_count(est.lora_params)} parameters per adapter",
        f"  {'stage':<14}{'peak':>7}" + "".join(f"{c:>12}" for c in (*COLUMNS, "overhead")),
    ]
    columns = (*COLUMNS, "overhead", *(("vllm",) if any("vllm" in s.parts for s in est.stages) else ()))
    lines[-1] = f"  {'stage':<14}{'peak':>7}" + "".join(f"{c:>12}" for c in columns)
    for s in est.stages:
        lines.append(f"  {s.stage:<14}{gib(s.total):>7}" + "".join(f"{gib(s.parts.get(c, 0)):>12}" for c in columns))
    peak = est.peak
    assert peak is not None  # a model's recipe always has stages that load it (training m0 at least)
    lines.append(f"  max: {gib(peak.total)} GiB (estimated), in {peak.stage}")
    if "vllm" in columns:
        lines.append("  vllm: the vLLM engine of the inference stages, beside the training base (stopped before each training"
                     " stage); on a GPU it takes inference.gpu_memory_utilization of it, without one it is counted with the KV"
                     " cache of inference.max_num_seqs full sequences (inference.kv_cache_gib fixes it)")
    lines.append(f"  every batch counted padded to model.max_length={est.max_length}, the worst case; unsloth's fused"
                 " loss and offloaded checkpointing need less")
    return "\n".join(lines)
