"""The dry run's check that prompts plus answers fit in model.max_length (minibt/context.py)."""

from __future__ import annotations

from click.testing import CliRunner

from minibt import io
from minibt.cli import main
from minibt.context import fit_notes
from minibt.recipe import load_recipe


def recipe_file(tmp_path, model_dir: str, max_length: int, curate: str = "{}") -> str:
    io.write_jsonl(tmp_path / "seed.jsonl", [{"instruction": "What is red?", "output": "The king is red."}])
    io.write_jsonl(tmp_path / "corpus.jsonl", [{"text": "The king is red."}])
    path = tmp_path / "r.yaml"
    path.write_text(f"""
model: {{name: {model_dir}, backend: transformers, max_length: {max_length}, device: cpu}}
seed: {{path: seed.jsonl}}
corpus: {{path: corpus.jsonl, min_chars: 200}}
curate: {curate}
""")
    return str(path)


def test_a_context_too_short_for_the_rubric_is_named(tiny_model_dir, tmp_path):
    short = fit_notes(load_recipe(recipe_file(tmp_path, tiny_model_dir, 512)))
    assert len(short) == 1 and "rubric" in short[0] and "model.max_length=512" in short[0]
    assert "~" not in short[0].split("rubric")[1][:4]  # counted with the model's own tokenizer, not estimated
    assert fit_notes(load_recipe(recipe_file(tmp_path, tiny_model_dir, 4096))) == []


def test_generate_mode_counts_the_reasoning(tiny_model_dir, tmp_path):
    fits = load_recipe(recipe_file(tmp_path, tiny_model_dir, 2048))
    assert fit_notes(fits) == []
    reasoning = load_recipe(recipe_file(tmp_path, tiny_model_dir, 2048, "{mode: generate, reasoning_tokens: 1900}"))
    assert "curate.reasoning_tokens=1900" in fit_notes(reasoning)[0]


def test_myx_prompt_and_answer_budget(tiny_model_dir, tmp_path):
    notes = fit_notes(load_recipe(recipe_file(tmp_path, tiny_model_dir, 64, "{method: likelihood}")))
    assert len(notes) == 1 and "augment.max_new_tokens=64" in notes[0]


def test_dry_run_prints_the_warning(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(main, ["run", recipe_file(tmp_path, tiny_model_dir, 512), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "context (model.max_length):" in result.output and "rubric" in result.output


def test_without_the_tokenizer_it_estimates(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: some-org/not-on-this-machine, max_length: 256}\nseed: {dataset: x/y}\ncorpus: {dataset: x/z}\n")
    notes = fit_notes(load_recipe(str(path)))
    assert len(notes) == 1 and "(~" in notes[0]
