"""The named role adapters on the one base: adding, loading, saving, deleting, and switching (`use`).

Every role of the method is a LoRA adapter on ONE PeftModel: `myx` (backward), `m0`, `m1`, ... (forward;
the curator of round k is m_{k-1}). Switching roles is `set_adapter`, never a reload. peft needs an
adapter at all times, so the backends' first one (the placeholder) lives until a role adapter exists.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from minibt.engine.interface import BASE
from minibt.engine.sampling import seeded
from minibt.errors import MinibtError
from minibt.sections import LoraSection

PLACEHOLDER = "default"  # the backends' first adapter; deleted once a role adapter exists


def lora_kwargs(lora: LoraSection) -> dict[str, Any]:
    """The recipe's LoRA shape, as peft's LoraConfig and unsloth's get_peft_model both take it."""
    return dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules),
                bias="none")


def lora_config(lora: LoraSection) -> Any:
    """THE LoraConfig of a role adapter (the engine's, and the bench's bare trl side)."""
    from peft import LoraConfig

    return LoraConfig(**lora_kwargs(lora), task_type="CAUSAL_LM")


def wrap(model: Any, lora: LoraSection, seed: int) -> Any:
    """A PeftModel over `model` with the placeholder adapter (initialised from `seed`)."""
    from peft import get_peft_model

    with seeded(seed):
        return get_peft_model(model, lora_config(lora))


def adapter_of(param_name: str) -> str | None:
    """The adapter a LoRA parameter belongs to: '...q_proj.lora_A.m1.weight' -> 'm1'."""
    parts = param_name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def saved_dtype(path: Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def load_weights(model: Any, name: str, path: Path) -> None:
    """Copy adapter `name`'s weights from a safetensors file into its own parameters (their dtypes stay), nothing else."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path))
    want = get_peft_model_state_dict(model, adapter_name=name)
    if set(weights) != set(want) or any(weights[k].shape != want[k].shape for k in want):
        raise MinibtError(f"{path}: does not hold adapter {name}'s weights; delete {path.parent} to train {name} from the start")
    # Any: peft annotates the return as `namedtuple` (the factory); it is torch's load_state_dict result
    result: Any = set_peft_model_state_dict(model, weights, adapter_name=name)
    if getattr(result, "unexpected_keys", None):
        raise MinibtError(f"{path}: weights {result.unexpected_keys[0]} ... do not fit adapter {name}")


def _sort_target_modules(config: Path) -> None:
    """peft keeps target_modules as a set and writes it in the set's order, which string hashing changes from
    process to process: sorted, the same adapter is the same file in every run (written as peft writes it)."""
    data = json.loads(config.read_text(encoding="utf-8"))
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        config.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")


def foldable(model: Any, name: str) -> list[Any]:
    """The LoRA layers of adapter `name` if every one can fold into its base weight: a plain float32
    nn.Linear (a 4-bit weight cannot hold W + s*B*A, and 16-bit rounding would eat much of the update),
    vanilla LoRA with float32 weights (one trained in bf16 on a 4-bit base keeps the bf16 path it
    trained with); else []."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
    f32 = torch.float32
    ok = all(type(m.base_layer) is torch.nn.Linear and m.base_layer.weight.dtype == f32 and name not in m.lora_variant
             and m.lora_A[name].weight.dtype == f32 and m.lora_B[name].weight.dtype == f32 for m in layers)
    return layers if ok else []


@contextlib.contextmanager
def folded(model: Any, name: str) -> Iterator[None]:
    """Inference with adapter `name` folded into float32 base weights for the block: x(W + sBA)^T is one
    matmul where the LoRA path adds two more and two elementwise passes (docs/speed.md: the same scores
    and texts, faster). The folded weights are copies;
    the base's own tensors are put back on exit, untouched (subtracting the update again would leave
    rounding in the base after every call). Costs one copy of the adapted weights while it lasts."""
    layers = foldable(model, name)
    if not layers:
        yield
        return
    originals = [m.base_layer.weight.data for m in layers]
    try:
        with torch.no_grad():
            for m, weight in zip(layers, originals):
                m.base_layer.weight.data = weight + m.get_delta_weight(name)
        with model.disable_adapter():
            yield
    finally:
        for m, weight in zip(layers, originals):
            m.base_layer.weight.data = weight


class Adapters:
    """The role adapters of one PeftModel, and which one is active (`use`)."""

    def __init__(self, model: Any, tokenizer: Any, backend: str, lora: LoraSection, seed: int, dtype: torch.dtype):
        self.model, self.tokenizer, self.backend, self.lora, self.seed, self.dtype = model, tokenizer, backend, lora, seed, dtype
        self.role = BASE  # the adapter the last `use` block made active
        self.fold = True  # inference folds a float32 adapter into the base (`folded`); off only to measure it

    @property
    def adapters(self) -> list[str]:
        return [a for a in self.model.peft_config if a != PLACEHOLDER]

    def add(self, name: str) -> None:
        """A fresh LoRA adapter `name`, initialised from the run seed and the name (reproducible, and
        torch's global generator is left as it was)."""
        self._check_new(name)
        with seeded(self.seed + sum(map(ord, name))):
            self.model.add_adapter(name, lora_config(self.lora))
        self._drop_placeholder()

    def load(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        """Load a PEFT adapter folder as `name`. Safetensors only."""
        path = Path(path)
        if not (path / "adapter_model.safetensors").is_file():
            raise MinibtError(f"{path}: no adapter_model.safetensors (minibt loads safetensors adapters only)")
        self._check_new(name)
        self.model.load_adapter(str(path), adapter_name=name, is_trainable=trainable, autocast_adapter_dtype=False)
        # peft upcasts loaded weights; keep the dtype training left (trl trains QLoRA weights in bf16),
        # so a reloaded adapter scores exactly as it did before it was saved
        saved = saved_dtype(path / "adapter_model.safetensors")
        for pname, p in self.model.named_parameters():
            if adapter_of(pname) == name:
                p.data = p.data.to(saved)
        if saved != self.dtype:  # peft loaded them in the base's dtype: fp32 weights were rounded, read them again
            load_weights(self.model, name, path / "adapter_model.safetensors")
        self._drop_placeholder()

    def save(self, name: str, path: str | os.PathLike) -> None:
        """Write adapter `name` as a PEFT folder (plus the tokenizer and its chat template), atomically."""
        self.require(name)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.model.save_pretrained(str(tmp), selected_adapters=[name], safe_serialization=True)
            saved = tmp / name  # peft writes non-default adapters into a subfolder
            _sort_target_modules(saved / "adapter_config.json")
            self.tokenizer.save_pretrained(str(saved))
            if path.exists():
                shutil.rmtree(path)
            os.replace(saved, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def delete(self, name: str) -> None:
        self.require(name)
        if len(self.model.peft_config) == 1:  # peft breaks without any adapter: keep a placeholder
            with seeded(self.seed):
                self.model.add_adapter(PLACEHOLDER, lora_config(self.lora))
        self.model.delete_adapter(name)

    @contextlib.contextmanager
    def use(self, name: str, trainable: bool = False) -> Iterator[None]:
        """Make adapter `name` (or "base": no adapter) the active one for the block."""
        self.role = name
        if name == BASE:
            if trainable:
                raise MinibtError("the base model is frozen; train an adapter")
            self._freeze_all()
            self.mode(training=False)
            with self.model.disable_adapter():
                yield
            return
        self.require(name)
        self.model.set_adapter(name)
        self._set_trainable(name if trainable else None)
        self.mode(training=trainable)
        plain = trainable or not self.fold or self.backend != "transformers"
        with contextlib.nullcontext() if plain else folded(self.model, name):
            yield

    def check_trainable(self, name: str | None) -> None:
        """Raise unless exactly adapter `name`'s LoRA weights (or nothing, for None) require grad."""
        wrong = [n for n, p in self.model.named_parameters() if p.requires_grad != (name is not None and adapter_of(n) == name)]
        if wrong:
            raise RuntimeError(f"trainable parameters do not match adapter {name!r}: e.g. {wrong[0]}")
        if name is not None and not any(p.requires_grad for p in self.model.parameters()):
            raise RuntimeError(f"adapter {name!r} has no trainable parameters")

    def mode(self, training: bool) -> None:
        """Train or eval mode, and the padding side that goes with it (left for batched generation)."""
        if self.backend == "unsloth":
            from unsloth import FastLanguageModel

            (FastLanguageModel.for_training if training else FastLanguageModel.for_inference)(self.model)
        self.model.train(training)
        self.tokenizer.padding_side = "right" if training else "left"

    def require(self, name: str) -> None:
        if name not in self.adapters:
            have = ", ".join(self.adapters) or "none"
            raise MinibtError(f"adapter {name!r} does not exist (have: {have}; 'base' means no adapter)")

    def _set_trainable(self, name: str | None) -> None:
        # peft's set_adapter/delete_adapter mark adapters trainable on their own, and peft has had
        # bugs leaving the wrong one trainable: set requires_grad ourselves, then check it.
        for pname, p in self.model.named_parameters():
            p.requires_grad = name is not None and adapter_of(pname) == name
        self.check_trainable(name)

    def _freeze_all(self) -> None:
        for p in self.model.parameters():
            p.requires_grad = False

    def _check_new(self, name: str) -> None:
        if name in (BASE, PLACEHOLDER, "forward") or not name.isidentifier():
            # "forward" collides with nn.Module.forward inside peft
            raise MinibtError(f"adapter name {name!r} is reserved or not an identifier")
        if name in self.adapters:
            raise MinibtError(f"adapter {name!r} already exists")

    def _drop_placeholder(self) -> None:
        if PLACEHOLDER in self.model.peft_config and len(self.model.peft_config) > 1:
            with warnings.catch_warnings():  # "Adapter default was active which is now deleted": by design
                warnings.filterwarnings("ignore", message="Adapter default was active")
                self.model.delete_adapter(PLACEHOLDER)
            self._freeze_all()  # peft marks the adapter it activates trainable


class BaseOnly:
    """The roles of a model without adapters: only "base" (a judge loaded on its own)."""

    def __init__(self, model: Any, tokenizer: Any):
        self.model, self.tokenizer = model, tokenizer
        self.adapters: list[str] = []

    def load(self, name: str, path: str | os.PathLike, trainable: bool = False) -> None:
        raise MinibtError(f"a judge loaded with --judge-model takes no adapters (asked for {name!r})")

    def delete(self, name: str) -> None:
        raise MinibtError(f"a judge loaded with --judge-model has no adapter {name!r}")

    @contextlib.contextmanager
    def use(self, name: str, trainable: bool = False) -> Iterator[None]:
        if name != BASE or trainable:
            raise MinibtError("a judge loaded with --judge-model has no adapters")
        self.model.eval()
        self.tokenizer.padding_side = "left"
        yield
