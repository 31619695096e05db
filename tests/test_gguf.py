"""A .gguf file as model.name: read, converted once to a safetensors folder, special tokens from the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from minibt.errors import RecipeError
from minibt.gguf import converted_folder, is_gguf, read_metadata
from tiny_gguf import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


def test_converted_folder_holds_the_same_model_and_the_files_special_tokens(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = tiny
    folder = converted_folder(path, cache=tmp_path)
    assert sorted(p.name for p in folder.glob("*.safetensors")) == ["model.safetensors"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # transformers' own conversion names <|im_start|> (the bos field) as eos; the file says <|im_end|>
    assert (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_start|>", "<|im_end|>")
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    ids = tokenizer("the capital of france is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_conversion_happens_once(tiny, tmp_path):
    path, _ = tiny
    first = converted_folder(path, cache=tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert converted_folder(path, cache=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == [first.name]  # no half-written folder left


def test_damaged_and_missing_files_are_one_line_errors(tiny, tmp_path):
    path, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:4096])
    with pytest.raises(RecipeError, match=r"^model.name: .*cut.gguf is not a readable GGUF file"):
        read_metadata(cut)
    with pytest.raises(RecipeError, match="not found"):
        read_metadata(tmp_path / "absent.gguf")
    assert is_gguf("x/Model.Q4_1.GGUF") and not is_gguf("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_an_architecture_transformers_cannot_read_is_refused_by_name(tmp_path):
    path = tmp_path / "odd.gguf"
    write_tiny_gguf(path, architecture="notanarch")
    with pytest.raises(RecipeError, match="holds a 'notanarch' model; transformers reads GGUF files of .*llama"):
        converted_folder(path, cache=tmp_path)
    assert not any((tmp_path / "gguf").iterdir())


def test_a_recipe_checks_its_gguf_before_any_model_loads(tiny, tmp_path):
    from minibt.recipe import from_dict

    path, _ = tiny
    seed = Path(__file__).parent / "fixtures" / "pairs_prompt_response.jsonl"
    raw = {"model": {"name": str(path)}, "seed": {"path": str(seed), "columns": {"instruction": "prompt", "output": "response"}},
           "corpus": {"path": str(seed), "text_column": "response"}}
    assert from_dict(raw).model.name == str(path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(RecipeError, match="bad.gguf is not a readable GGUF file"):
        from_dict({**raw, "model": {"name": str(bad)}})
