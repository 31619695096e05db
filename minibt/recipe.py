"""The recipe: typed dataclasses loaded from YAML, with `section.key=value` overrides.

Everything is validated here, before any model loads: unknown keys (with the nearest valid key
suggested), wrong types, out-of-range values and missing files all raise RecipeError with one
line that names the culprit.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from minibt.errors import RecipeError


# --- sections -------------------------------------------------------------------------------

# A key set away from its default that the rest of the recipe makes do nothing is refused (`_unused`):
# a user who sets it expects an effect. Machine-dependent keys (run.threads, packing,
# gradient_checkpointing) are not: the same recipe uses them on another machine.

NO_WARMUP_SCHEDULERS = ("constant", "reduce_lr_on_plateau", "greedy")  # transformers' get_scheduler


@dataclass
class RunSection:
    name: str = ""  # default: the recipe file's stem; the run directory is runs/<name>
    seed: int = 0  # fixes data order, LoRA init and sampling
    threads: int = 1  # torch CPU threads: one per process is stable on small VMs (STACK-NOTES); unused on a GPU


@dataclass
class ModelSection:
    # HF hub id or local folder. With a `toy` section the world builds the base: name, revision,
    # trust_remote_code and chat_template (its tokenizer has minibt's) are refused there
    name: str = ""
    backend: Literal["auto", "unsloth", "transformers"] = "auto"
    quantization: Literal["nf4", "none"] = "nf4"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # compute dtype
    max_length: int = 1024  # tokens per training example / prompt
    chat_template: Literal["auto", "minibt"] = "auto"  # auto: the tokenizer's own, else minibt's
    trust_remote_code: bool = False
    revision: Optional[str] = None  # a hub commit, branch or tag: a local folder has none
    # auto: the CUDA GPU; with none visible a real recipe stops (the toy world runs on the CPU).
    # cpu: run on the CPU anyway, knowingly (stack_guards.require_device)
    device: Literal["auto", "cpu"] = "auto"

    def check(self, key: str) -> None:
        _positive(f"{key}.max_length", self.max_length)
        if self.revision is not None and _looks_local(self.name):
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
        _positive(f"{key}.r", self.r)
        _positive(f"{key}.alpha", self.alpha)
        _in_range(f"{key}.dropout", self.dropout, 0.0, 1.0)
        if not self.target_modules:
            raise RecipeError(f"{key}.target_modules: must name at least one module")


@dataclass
class SeedSection:
    """Seed pairs: a local file (JSONL, JSON, Parquet) or a HF dataset id."""

    path: Optional[str] = None
    dataset: Optional[str] = None
    split: str = "train"
    format: Literal["auto", "pairs", "oasst", "messages"] = "auto"
    columns: dict[str, str] = field(default_factory=dict)  # {instruction: prompt, output: response}
    limit: Optional[int] = None
    max_bad_fraction: float = 0.05  # malformed rows beyond this share are an error

    def check(self, key: str) -> None:
        _source(key, self.path, self.dataset)
        _only_hub_datasets(key, self, "split")
        _in_range(f"{key}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.limit is not None:
            _positive(f"{key}.limit", self.limit)
        if self.columns and self.format in ("oasst", "messages"):
            raise RecipeError(f"{key}.columns: format {self.format} has no columns to map (only pairs has); remove the key")
        bad = set(self.columns) - {"instruction", "output"}
        if bad:
            raise RecipeError(f"{key}.columns: unknown target {sorted(bad)[0]!r} (use instruction, output)")


@dataclass
class CorpusSection:
    """Unlabelled texts: a local file (JSONL, Parquet, .txt) or a HF dataset id (streamed)."""

    path: Optional[str] = None
    dataset: Optional[str] = None
    name: Optional[str] = None  # the hub dataset's config name
    split: str = "train"
    text_column: str = "text"  # JSONL, Parquet and hub rows; a .txt file's documents are its blank-line blocks
    limit: Optional[int] = None
    min_chars: int = 0
    max_chars: int = 0  # 0: no upper bound; longer documents are segmented into passages
    dedup: bool = True
    max_bad_fraction: float = 0.05

    def check(self, key: str) -> None:
        _source(key, self.path, self.dataset)
        _only_hub_datasets(key, self, "name", "split")
        if self.path and Path(self.path).suffix.lower() == ".txt" and _changed(self, "text_column"):
            raise RecipeError(f"{key}.text_column: a .txt corpus has no columns (documents are blank-line blocks); remove the key")
        _in_range(f"{key}.max_bad_fraction", self.max_bad_fraction, 0.0, 1.0)
        if self.limit is not None:
            _positive(f"{key}.limit", self.limit)
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
        _positive(f"{key}.epochs", self.epochs)
        _positive(f"{key}.learning_rate", self.learning_rate)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.grad_accum", self.grad_accum)
        _in_range(f"{key}.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.save_steps < 0:
            raise RecipeError(f"{key}.save_steps: must be >= 0 (0 switches checkpoints off), got {self.save_steps}")
        if self.max_steps > 0:
            _unused(key, self, ("epochs",), f"{key}.max_steps={self.max_steps} sets the length instead; remove one of them")
            if self.save_steps > self.max_steps:
                _unused(key, self, ("save_steps",), f"{self.save_steps} is past {key}.max_steps={self.max_steps}, so no checkpoint is ever written")
        if self.lr_scheduler in NO_WARMUP_SCHEDULERS:
            _unused(key, self, ("warmup_ratio",), f"the {self.lr_scheduler} scheduler has no warmup; remove the key")


@dataclass
class AugmentSection:
    temperature: float = 0.7  # the paper's sampling; 0 decodes greedily (then top_p is refused)
    top_p: float = 0.9
    max_new_tokens: int = 64
    batch_size: int = 16
    shard_size: int = 512  # texts per shard file: a killed run redoes at most one shard

    def check(self, key: str) -> None:
        _in_range(f"{key}.temperature", self.temperature, 0.0, 10.0)
        _in_range(f"{key}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        if self.temperature == 0:
            _unused(key, self, ("top_p",), f"{key}.temperature=0 decodes greedily, without sampling; remove the key")
        _positive(f"{key}.max_new_tokens", self.max_new_tokens)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.shard_size", self.shard_size)


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
    ratings: Optional[str] = None  # JSONL rows {instruction, output, score 1-5}; the toy world writes its own

    def check(self, key: str) -> None:
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.shard_size", self.shard_size)
        _positive(f"{key}.reasoning_tokens", self.reasoning_tokens)
        if self.method == "rubric":
            _in_range(f"{key}.threshold", self.threshold, 1.0, 5.0)
        if self.method == "likelihood":
            _unused(key, self, ("mode", "score", "reasoning_tokens"), f"only the rubric method reads it ({key}.method is likelihood); remove the key")
        elif self.mode == "generate":
            _unused(key, self, ("score",), f"mode=generate parses the score the curator writes; expected/argmax apply to mode=distribution; remove the key")
        else:
            _unused(key, self, ("reasoning_tokens",), f"only mode=generate writes reasoning ({key}.mode is distribution); remove the key")
        if self.ratings and not self.calibrate:
            raise RecipeError(f"{key}.ratings: read only with {key}.calibrate=true; set it or remove the key")


@dataclass
class ForwardSection(TrainSection):
    rounds: int = 1  # round k: curator m_{k-1} scores the augmented pairs, m_k trains on seed + kept
    tags: bool = True  # the paper's system-prompt tags for seed vs augmented data (the tags need it)
    seed_tag: str = "Answer in the style of an AI Assistant."
    augmented_tag: str = "Answer with knowledge from web search."

    def check(self, key: str) -> None:
        super().check(key)
        _positive(f"{key}.rounds", self.rounds)
        if not self.tags:
            _unused(key, self, ("seed_tag", "augmented_tag"), f"{key}.tags is false, so no tag is written; remove the key")


@dataclass
class Recipe:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    seed: SeedSection = field(default_factory=SeedSection)
    corpus: CorpusSection = field(default_factory=CorpusSection)
    backward: TrainSection = field(default_factory=TrainSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    curate: CurateSection = field(default_factory=CurateSection)
    forward: ForwardSection = field(default_factory=ForwardSection)
    toy: Optional[dict[str, Any]] = None  # the toy world's knobs (minibt/toy), validated there

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading --------------------------------------------------------------------------------


def load_recipe(path: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read a recipe file, apply `section.key=value` overrides, validate everything."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{path}{where}: broken YAML: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item)
    recipe = from_dict(raw, base_dir=path.parent)
    if not recipe.run.name:
        recipe.run.name = path.stem
    return recipe


def from_dict(raw: dict[str, Any], base_dir: Path | None = None) -> Recipe:
    recipe = _build(Recipe, raw, "")
    if recipe.toy is not None:  # before the sections' own checks: this is the reason to give
        _refuse_with_toy(recipe)
    _check(recipe, "")
    if recipe.toy is None:
        for key in ("seed", "corpus"):
            section = getattr(recipe, key)
            if not section.path and not section.dataset:
                raise RecipeError(f"{key}: give {key}.path (a local file) or {key}.dataset (a HF dataset id)")
        if not recipe.model.name:
            raise RecipeError("model.name: missing (a HF model id or a local folder)")
        for key in ("seed", "corpus"):
            section = getattr(recipe, key)
            if section.path is not None:
                section.path = str(_resolve(section.path, base_dir, f"{key}.path"))
        if recipe.curate.calibrate and not recipe.curate.ratings:
            raise RecipeError("curate.calibrate: needs curate.ratings (a JSONL of pairs rated 1-5)")
        if _looks_local(recipe.model.name) and not Path(recipe.model.name).expanduser().exists():
            raise RecipeError(f"model.name: local folder {recipe.model.name} not found")
    else:
        from minibt.toy.world import WorldConfig  # the toy world validates its own section

        world = _build(WorldConfig, recipe.toy, "toy")
        _check(world, "toy")
        recipe.toy = dataclasses.asdict(world)
    if recipe.curate.ratings:
        recipe.curate.ratings = str(_resolve(recipe.curate.ratings, base_dir, "curate.ratings"))
    return recipe


TOY_MAKES = {"seed": "its own seed", "corpus": "its own corpus"}
TOY_MODEL_KEYS = ("name", "revision", "trust_remote_code", "chat_template")  # its base has minibt's template


def _refuse_with_toy(recipe: Recipe) -> None:
    for key, what in TOY_MAKES.items():
        section = getattr(recipe, key)
        _unused(key, section, [f.name for f in dataclasses.fields(section)],
                f"the toy world makes {what}; remove the key or the toy section")
    _unused("model", recipe.model, TOY_MODEL_KEYS, "the toy world builds its own base; remove the key or the toy section")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise RecipeError(f"override {item!r}: expected section.key=value")
    dotted, value = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for k in keys[:-1]:
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise RecipeError(f"override {dotted}: {k} is not a section")
        node = node[k]
    node[keys[-1]] = yaml.safe_load(value) if value.strip() else ""


def _build(cls: type, raw: Any, key: str) -> Any:
    where = key or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping of keys, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in raw.items():
        full = f"{key}.{k}" if key else str(k)
        if k not in names:
            near = difflib.get_close_matches(str(k), names, n=1, cutoff=0.6)
            hint = f" (did you mean {(key + '.') if key else ''}{near[0]}?)" if near else ""
            valid = ", ".join(names)
            raise RecipeError(f"{full}: unknown key{hint}; valid keys: {valid}")
        kwargs[k] = _coerce(hints[k], v, full)
    return cls(**kwargs)


def _coerce(tp: Any, v: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], v, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, v if v is not None else {}, key)
    if origin is Literal:
        if v not in args:
            raise RecipeError(f"{key}: {v!r} is not one of {', '.join(map(str, args))}")
        return v
    if origin is list:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise RecipeError(f"{key}: expected a list of strings, got {_kind(v)}")
        return list(v)
    if origin is dict:
        if not isinstance(v, dict):
            raise RecipeError(f"{key}: expected a mapping, got {_kind(v)}")
        if args and args[1] is str and not all(isinstance(x, str) for x in v.values()):
            raise RecipeError(f"{key}: expected a mapping of strings")
        return dict(v)
    if tp is Any:
        return v
    if tp is bool:
        if not isinstance(v, bool):
            raise RecipeError(f"{key}: expected true or false, got {_kind(v)}")
        return v
    if tp is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise RecipeError(f"{key}: expected an integer, got {_kind(v)}")
        return v
    if tp is float:
        if isinstance(v, str):  # YAML 1.1 reads 2e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {_kind(v)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise RecipeError(f"{key}: expected a string, got {_kind(v)}")
        return v
    raise TypeError(f"recipe field {key} has an unsupported type {tp}")  # a bug in minibt


def _check(obj: Any, key: str) -> None:
    if hasattr(obj, "check"):
        obj.check(key)
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check(v, f"{key}.{f.name}" if key else f.name)


def _kind(v: Any) -> str:
    return "nothing" if v is None else f"{type(v).__name__} {v!r}"[:80]


def _positive(key: str, v: float) -> None:
    if not v > 0:
        raise RecipeError(f"{key}: must be > 0, got {v}")


def _in_range(key: str, v: float, lo: float, hi: float, low_open: bool = False) -> None:
    if v < lo or v > hi or (low_open and v == lo):
        raise RecipeError(f"{key}: must be in {'(' if low_open else '['}{lo}, {hi}], got {v}")


def _source(key: str, path: Optional[str], dataset: Optional[str]) -> None:
    if path and dataset:
        raise RecipeError(f"{key}: give path or dataset, not both")


def _changed(obj: Any, *names: str) -> Optional[str]:
    """The first of `names` whose value differs from the dataclass default: a key the recipe set
    (spelling a default out is not setting it)."""
    for f in dataclasses.fields(obj):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name in names and getattr(obj, f.name) != default:
            return f.name
    return None


def _unused(key: str, obj: Any, names: typing.Iterable[str], why: str) -> None:
    """Refuse the first of `names` set away from its default: the recipe makes it do nothing."""
    name = _changed(obj, *names)
    if name is not None:
        raise RecipeError(f"{key}.{name}: {why}")


def _only_hub_datasets(key: str, section: Any, *names: str) -> None:
    if not section.dataset:
        _unused(key, section, names, f"only a hub dataset ({key}.dataset) reads it; remove the key")


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~"))


def _resolve(p: str, base_dir: Path | None, key: str) -> Path:
    path = Path(p).expanduser()
    if not path.is_absolute() and not path.exists() and base_dir is not None:
        # relative paths resolve from the working directory first, then beside the recipe
        if (base_dir / path).exists():
            path = base_dir / path
    if not path.exists():
        raise RecipeError(f"{key}: file {p} not found")
    return path.resolve()
