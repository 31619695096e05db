"""The shipped recipes dry-run clean (plan and memory estimate, nothing loaded, no network), say what
the paper says where they claim to, run by name (`minibt run toy`), list and copy out, and the Colab
notebook is valid and runs README's commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

import minibt.memory as memory
from minibt import recipes as builtin
from minibt.cli import main
from minibt.memory import GiB, estimate
from minibt.pipeline import plan
from minibt.recipe import load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = [builtin.builtin_path(name) for name in builtin.names()]  # minibt/recipes/*.yaml, package data
REAL = ["colab-t4.yaml", "cpu-135m.yaml", "gpu-24gb.yaml", "paper.yaml"]
NOTEBOOK = ROOT / "notebooks" / "minibt_colab.ipynb"


@pytest.fixture
def nothing_loads(monkeypatch):
    """Loading a model, building the toy base or reaching the hub fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must load nothing")

    import transformers

    import minibt.engine
    import minibt.toy.base

    monkeypatch.setattr(minibt.engine.Engine, "load", classmethod(refuse))
    monkeypatch.setattr(minibt.toy.base, "build_base", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(memory, "_download_config", lambda *a: (_ for _ in ()).throw(OSError("offline (test)")))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_dry_run_prints_plan_and_estimate_and_loads_nothing(path, nothing_loads, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "load_config", lambda *a: None)  # as offline, even with a warm HF cache
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["run", str(path), "--dry-run", "--out", str(out)])
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    assert "stages: " + " -> ".join(plan(recipe)) in result.output
    device = "peak RSS of the process" if recipe.model.device == "cpu" else "peak GPU memory"
    assert f"memory estimate ({device} in GiB: an estimate" in result.output
    assert re.search(r"max: \d+\.\d\d GiB \(estimated\), in \w+", result.output)
    for stage in plan(recipe)[1:]:  # prepare runs on the CPU
        assert re.search(rf"^  {stage} +\d+\.\d\d", result.output, re.M), stage
    if path.name in REAL:
        assert "estimated from a known shape" in result.output
    assert not out.exists()


@pytest.mark.parametrize("name, gib", [("colab-t4.yaml", 15.0), ("gpu-24gb.yaml", 23.0), ("paper.yaml", 23.0)])
def test_real_recipes_fit_their_card_by_the_estimate(name, gib, monkeypatch):
    """The named card's usable memory (T4: ~15 GiB; 24 GB cards: ~23.5) holds the worst-case estimate."""
    monkeypatch.setattr(memory, "load_config", lambda *a: None)
    est = estimate(load_recipe(builtin.builtin_path(name)))
    assert est.shape is not None and est.peak.total < gib * GiB


@pytest.mark.parametrize("name", [n for n in REAL if n != "cpu-135m.yaml"])
def test_real_recipes_use_base_models_with_minibt_template(name):
    r = load_recipe(builtin.builtin_path(name))
    assert "instruct" not in r.model.name.lower() and "chat" not in r.model.name.lower()  # base models, as the paper
    assert r.model.chat_template == "minibt"  # base repos ship instruct templates with untrained header tokens
    assert r.model.quantization == "nf4"
    assert (r.seed.dataset, r.seed.format) == ("OpenAssistant/oasst1", "oasst")
    assert r.corpus.dataset and (r.corpus.min_chars, r.corpus.max_chars) == (600, 3000)
    assert (r.augment.temperature, r.augment.top_p) == (0.7, 0.9)
    assert r.forward.tags


def test_cpu_recipe_runs_the_small_instruct_model_on_the_cpu_with_its_own_template():
    # the one real model every machine of ours has: an instruct model, whose ChatML turn end is a trained token
    r = load_recipe(builtin.builtin_path("cpu-135m"))
    assert r.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and r.model.device == "cpu"
    assert (r.model.chat_template, r.model.quantization, r.run.threads) == ("auto", "none", 0)  # measured: docs/speed.md
    assert (r.seed.dataset, r.seed.format) == ("OpenAssistant/oasst1", "oasst")
    assert (r.augment.temperature, r.augment.top_p, r.curate.method) == (0.7, 0.9, "rubric")


def test_colab_recipe_fits_a_t4():
    r = load_recipe(builtin.builtin_path("colab-t4"))
    assert r.model.dtype in ("float16", "auto")  # a T4 has no bfloat16
    assert 10_000 <= r.corpus.limit < 100_000


def test_paper_recipe_is_the_papers():
    r = load_recipe(builtin.builtin_path("paper"))
    assert r.forward.rounds == 2
    assert (r.curate.method, r.curate.score, r.curate.threshold) == ("rubric", "argmax", 5.0)
    assert plan(r)[-4:] == ["curate_r1", "m1", "curate_r2", "m2"]


# --- built-in recipes by name ---------------------------------------------------------------


def test_the_builtins_are_the_shipped_recipes_and_the_clone_sees_them_at_recipes():
    assert builtin.names() == ["colab-t4", "cpu-135m", "gpu-24gb", "paper", "toy"]
    assert (ROOT / "recipes").resolve() == (ROOT / "minibt" / "recipes").resolve()  # README's recipes/toy.yaml, in a clone


def test_run_takes_a_builtin_by_name(nothing_loads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the name alone finds it
    result = CliRunner().invoke(main, ["run", "toy", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "\nrun directory: runs/toy\n" in result.output  # the run is named after the built-in
    assert "stages: " + " -> ".join(plan(load_recipe(builtin.builtin_path("toy")))) in result.output


def test_a_file_beats_a_builtin_of_the_same_name(nothing_loads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy.yaml").write_text(builtin.builtin_path("toy").read_text().replace("name: toy", "name: mine"))
    result = CliRunner().invoke(main, ["run", "toy.yaml", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "run directory: runs/mine" in result.output


@pytest.mark.parametrize("arg, hint", [("toyy", ""), ("elsewhere/toy.yaml", "; did you mean the built-in 'toy'?")])
def test_neither_a_file_nor_a_builtin_is_one_line_listing_the_builtins(arg, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", arg, "--dry-run"])
    assert result.exit_code == 2
    assert result.output == (f"error: {arg}: no such recipe file, and not a built-in recipe (built-ins: colab-t4, "
                             f"cpu-135m, gpu-24gb, paper, toy; `minibt recipes` lists them){hint}\n")


def test_minibt_recipes_lists_each_with_its_first_comment_line():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[0] for line in lines] == builtin.names()
    toy_line = next(line for line in lines if line.startswith("toy "))
    first_comment = builtin.builtin_path("toy").read_text().splitlines()[0].lstrip("# ")
    assert toy_line.split(None, 1)[1] == first_comment


def test_minibt_recipes_copy_writes_one_out_and_keeps_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    shipped = builtin.builtin_path("toy").read_text()
    result = runner.invoke(main, ["recipes", "copy", "toy"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "toy.yaml").read_text() == shipped and "minibt run toy.yaml" in result.output
    (tmp_path / "toy.yaml").write_text("# my edits\n")
    again = runner.invoke(main, ["recipes", "copy", "toy"])
    assert again.exit_code == 2 and again.output == "error: toy.yaml: already exists (--force replaces it)\n"
    assert (tmp_path / "toy.yaml").read_text() == "# my edits\n"
    assert runner.invoke(main, ["recipes", "copy", "toy", "--force"]).exit_code == 0
    assert (tmp_path / "toy.yaml").read_text() == shipped
    (tmp_path / "mine").mkdir()
    assert runner.invoke(main, ["recipes", "copy", "paper", "mine"]).exit_code == 0  # into a folder
    assert runner.invoke(main, ["recipes", "copy", "paper.yaml", "mine/p2.yaml"]).exit_code == 0  # to a file
    assert (tmp_path / "mine" / "paper.yaml").read_text() == (tmp_path / "mine" / "p2.yaml").read_text() \
        == builtin.builtin_path("paper").read_text()
    unknown = runner.invoke(main, ["recipes", "copy", "nope"])
    assert unknown.exit_code == 2 and "nope: not a built-in recipe (built-ins: colab-t4, cpu-135m, gpu-24gb, paper, toy)" in unknown.output


def test_the_bench_default_recipe_is_the_builtin_toy():
    from minibt.bench import default_recipe_path

    assert default_recipe_path() == builtin.builtin_path("toy")


# --- the notebook ---------------------------------------------------------------------------


def _parameters(nb) -> tuple[int, dict]:
    """The parameters cell (tagged as papermill finds it): its index and the defaults it sets."""
    cells = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"one cell tagged 'parameters', not {len(cells)}"
    values: dict = {}
    exec(nb.cells[cells[0]].source, values)
    return cells[0], {k: v for k, v in values.items() if k.isupper()}


def _shell_lines(nb) -> list[str]:
    """The notebook's `!minibt ...` commands as a terminal would take them, {VARIABLES} expanded with the
    parameters cell's defaults, and `--out RUN` left out where RUN is the recipe's own run directory."""
    _, params = _parameters(nb)
    run_dir = f"runs/{load_recipe(ROOT / params['RECIPE']).run.name}"
    lines = [line.strip()[1:].split("  #")[0].strip() for cell in nb.cells if cell.cell_type == "code"
             for line in cell.source.splitlines() if line.strip().startswith("!minibt ")]
    commands = [" ".join(line.format(**params).split()) for line in lines]
    assert all(f"--out {run_dir}" in c for c in commands), commands  # the cells after the run read RUN
    return [c.replace(f" --out {run_dir}", "") for c in commands]


def test_notebook_is_valid_and_runs_readmes_commands():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    index, params = _parameters(nb)
    assert index <= 2  # near the top, where a Colab user sees it
    assert params == {"RECIPE": "recipes/colab-t4.yaml", "OVERRIDES": "", "RUN": "runs/colab-t4",
                      "MAX_NEW_TOKENS": 300, "ON_COLAB": True}  # a Colab user runs the Colab recipe, unchanged
    commands = _shell_lines(nb)
    assert "minibt run recipes/colab-t4.yaml" in commands
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for command in commands:
        assert command in readme, f"the notebook runs {command!r}, which README does not give"
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert 'pip install -q -e ".[unsloth]"' in code
    assert 'f"{RUN}/data/scored_r1.jsonl"' in code and 'scored["kept"]' in code and "expected_score" in code
    assert 'adapter="m0"' in code and 'adapter="m1"' in code and "minibt.open_run(RUN)" in code
    assert "upload_folder(" in code and "/content/drive" in code
    for cell in nb.cells:  # what needs Colab runs only there, so the notebook runs elsewhere (tests/test_notebook.py)
        if cell.cell_type == "code" and any(w in line for w in ("nvidia-smi", "git clone", "google.colab", "login()")
                                            for line in cell.source.splitlines() if not line.lstrip().startswith("#")):
            assert cell.source.startswith("if ON_COLAB:\n"), cell.source


def test_every_notebook_code_cell_is_python():
    """Shell and magic lines (! and %) aside, each code cell compiles: a slip in the build script (an escape that
    became a newline inside a string) fails here, not minutes into tests/test_notebook.py."""
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            source = re.sub(r"^(\s*)[!%].*$", r"\1pass", cell.source, flags=re.M)
            compile(source, f"cell {cell.get('id')}", "exec")


def test_notebook_matches_its_build_script():
    nbformat = pytest.importorskip("nbformat")
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebook", ROOT / "notebooks" / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built, saved = module.build(), nbformat.read(NOTEBOOK, as_version=4)
    cells = lambda nb: [(c.cell_type, c.source, c.metadata) for c in nb.cells]  # metadata: the parameters tag
    assert cells(built) == cells(saved), \
        "notebooks/minibt_colab.ipynb is stale: run python notebooks/build_notebook.py"


# --- the chat template the real recipes ask for ----------------------------------------------

SHIPPED = {  # the kind of instruct template some BASE repos ship (Llama 3.x, Qwen2.5), in miniature
    "llama3": "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}",
    "qwen2.5": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
}


def base_like_tokenizer(kind: str):
    """A small tokenizer with the special tokens of a Llama-3 or Qwen2.5 BASE repo, and its shipped template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = {"llama3": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "qwen2.5": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]}[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["### System:\n### User:\n### Assistant:\nhello world"],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if kind == "llama3":  # Meta's base tokenizer: BOS <|begin_of_text|>, EOS <|end_of_text|>, no pad
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    else:  # Qwen2.5 base: no BOS, EOS = pad = <|endoftext|>
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = SHIPPED[kind]
    return fast


@pytest.mark.parametrize("kind, eos", [("llama3", "<|end_of_text|>"), ("qwen2.5", "<|endoftext|>")])
def test_minibt_template_ends_assistant_turns_with_the_base_eos(kind, eos):
    """`chat_template: minibt` replaces a shipped template; the EOS that ends every assistant turn, that
    trl appends to every completion and that generation stops on is the base's own end-of-text token."""
    from minibt.engine import set_chat_template
    from minibt.prompts import CHAT_TEMPLATE
    from minibt.recipe import ModelSection

    shipped = base_like_tokenizer(kind)
    set_chat_template(shipped, ModelSection(name="x"))  # auto keeps what the repo shipped: the hazard
    assert shipped.chat_template == SHIPPED[kind]

    tok = base_like_tokenizer(kind)
    set_chat_template(tok, ModelSection(name="x", chat_template="minibt"))
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == eos
    assert tok.pad_token == eos  # Llama 3 base has no pad: EOS; Qwen2.5 base pads with its EOS already
    turn = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    assert tok.apply_chat_template(turn, tokenize=False).endswith(f"world{eos}\n\n")
    prompt = tok.apply_chat_template(turn[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("### Assistant:\n") and "<|" not in prompt  # no header tokens a base never trained
    ids = tok(prompt + "world" + tok.eos_token)["input_ids"]  # what trl trains on: completion + EOS text
    assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1
