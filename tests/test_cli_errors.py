"""The catalogue of bad inputs, through `minibt run` as a user meets them.

Each is one line naming the culprit (recipe key, file, line), exit code 2, no traceback, and (where
the problem is in the input) no model loaded.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from minibt import engine as engine_mod
from minibt import io
from minibt.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


def recipe(model: str, seed: str = "seed.jsonl", corpus: str = "corpus.jsonl", extra: str = "") -> str:
    return f"""
model: {{name: {model}, quantization: none, max_length: 256, device: cpu}}
seed: {{path: {seed}}}
corpus: {{path: {corpus}}}
backward: {{max_steps: 1, batch_size: 2}}
forward: {{max_steps: 1, batch_size: 2}}
{extra}
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir) -> Path:
    monkeypatch.chdir(tmp_path)
    io.write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "What is red?", "output": "A color."}] * 4)
    io.write_jsonl(tmp_path / "corpus.jsonl", [{"text": "Red is a color of the king."}] * 2)
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    return tmp_path


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for bad input")

    monkeypatch.setattr(engine_mod.load, "load_base", refuse)


def run(*args: str):
    result = CliRunner().invoke(main, ["run", *args])
    return result, result.output.strip().splitlines()


def check_one_line(result, lines, *needles):
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "text, needles",
    [
        (recipe("./model", extra="curate: {treshold: 4}"), ["curate.treshold: unknown key", "did you mean curate.threshold?"]),
        (recipe("./model", extra="augment: {batch_size: many}"), ["augment.batch_size: expected an integer, got str 'many'"]),
        (recipe("./model", extra="augment: {batch_size: 0}"), ["augment.batch_size: must be > 0"]),
        (recipe("./model") + "lora: {r: [\n", ["r.yaml:", "broken YAML"]),
        (recipe("./model", seed="nope.jsonl"), ["seed.path: file nope.jsonl not found"]),
        (recipe("./no-such-model"), ["model.name: local folder ./no-such-model not found"]),
    ],
)
def test_recipe_errors(workdir, no_model_loads, text, needles):
    (workdir / "r.yaml").write_text(text)
    check_one_line(*run("r.yaml"), *needles)


def test_malformed_seed_rows_name_the_file_and_lines(workdir, no_model_loads):
    shutil.copy(FIXTURES / "pairs_bad.jsonl", workdir / "bad.jsonl")
    (workdir / "r.yaml").write_text(recipe("./model", seed="bad.jsonl"))
    check_one_line(*run("r.yaml"), "bad.jsonl", "4 of 20 rows malformed", "line 4", "seed.max_bad_fraction")


def test_malformed_rows_under_the_allowed_fraction_are_skipped_and_counted(workdir):
    shutil.copy(FIXTURES / "pairs_bad.jsonl", workdir / "bad.jsonl")
    (workdir / "r.yaml").write_text(recipe("./model", seed="bad.jsonl"))
    result, _ = run("r.yaml", "seed.max_bad_fraction=0.5", "--out", "out")
    assert result.exit_code == 0, result.output
    counts = io.read_jsonl(workdir / "out" / "data" / "seed.jsonl")
    assert len(counts) == 16


def test_empty_and_unreadable_files(workdir, no_model_loads):
    (workdir / "empty.jsonl").write_text("")
    (workdir / "r.yaml").write_text(recipe("./model", seed="empty.jsonl"))
    check_one_line(*run("r.yaml"), "empty.jsonl", "empty")
    io.write_jsonl(workdir / "columns.jsonl", [{"instruction": "only"}])
    (workdir / "r.yaml").write_text(recipe("./model", seed="columns.jsonl"))
    check_one_line(*run("r.yaml"), "columns.jsonl", "cannot tell the seed format", "seed.columns")
    io.write_jsonl(workdir / "nothing.jsonl", [{"instruction": "x", "output": ""}])
    (workdir / "r.yaml").write_text(recipe("./model", seed="nothing.jsonl"))
    check_one_line(*run("r.yaml", "seed.max_bad_fraction=1.0"), "nothing.jsonl", "no usable")


def test_a_corpus_empty_after_filtering(workdir, no_model_loads):
    (workdir / "r.yaml").write_text(recipe("./model"))
    check_one_line(*run("r.yaml", "corpus.min_chars=5000"), "corpus.jsonl")


def test_a_run_directory_from_another_recipe_is_refused_then_fresh_starts_over(workdir):
    (workdir / "r.yaml").write_text(recipe("./model"))
    result, _ = run("r.yaml", "--out", "out")
    assert result.exit_code == 0, result.output
    check_one_line(*run("r.yaml", "--out", "out", "lora.r=4"), "different recipe", "lora.r: 16 before, 4 now", "--fresh")
    result, _ = run("r.yaml", "--out", "out", "lora.r=4", "--fresh")
    assert result.exit_code == 0, result.output


def test_a_folder_that_is_not_a_run_is_not_overwritten(workdir, no_model_loads):
    (workdir / "mine").mkdir()
    (workdir / "mine" / "thesis.tex").write_text("precious")
    (workdir / "r.yaml").write_text(recipe("./model"))
    check_one_line(*run("r.yaml", "--out", "mine"), "mine exists and is not a minibt run")
    assert (workdir / "mine" / "thesis.tex").read_text() == "precious"


def test_weights_must_be_safetensors(workdir):
    import torch
    from safetensors.torch import load_file

    shutil.copytree(workdir / "model", workdir / "pickled")
    weights = workdir / "pickled" / "model.safetensors"
    torch.save(load_file(weights), workdir / "pickled" / "pytorch_model.bin")  # pickle: can run code on load
    weights.unlink()
    (workdir / "r.yaml").write_text(recipe("./pickled"))
    check_one_line(*run("r.yaml"), "safetensors")


def test_a_base_without_chat_template_gets_minibts(workdir):
    import json

    from minibt.prompts import CHAT_TEMPLATE

    cfg = json.loads((workdir / "model" / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (workdir / "model" / "tokenizer_config.json").write_text(json.dumps(cfg))
    (workdir / "model" / "chat_template.jinja").unlink(missing_ok=True)
    (workdir / "r.yaml").write_text(recipe("./model"))
    result, _ = run("r.yaml", "--out", "out")
    assert result.exit_code == 0, result.output
    saved = workdir / "out" / "adapters" / "m1"
    template = (saved / "chat_template.jinja").read_text() if (saved / "chat_template.jinja").exists() else json.loads((saved / "tokenizer_config.json").read_text())["chat_template"]
    assert template == CHAT_TEMPLATE


def test_trust_remote_code_is_announced_and_no_credentials_are_written(workdir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")
    (workdir / "r.yaml").write_text(recipe("./model", extra="model: {name: ./model, quantization: none, max_length: 256, trust_remote_code: true, device: cpu}"))
    result, _ = run("r.yaml", "--out", "out")
    assert result.exit_code == 0, result.output
    assert "trust_remote_code is true" in result.output
    for path in (workdir / "out").rglob("*"):
        if path.is_file():
            assert b"hf_secret_value_123" not in path.read_bytes(), path


def test_a_key_the_toy_world_ignores_fails_the_dry_run(workdir, no_model_loads):
    toy = Path(__file__).parent.parent / "recipes" / "toy.yaml"
    check_one_line(*run(str(toy), "seed.path=seed.jsonl", "--dry-run"),
                   "seed.path: the toy world makes its own seed; remove the key or the toy section")
