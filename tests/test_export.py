"""`minibt export`: a merged 16-bit model folder that plain transformers loads and generates with; hub push."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from minibt.cli import main


def _export(run: Path, out: Path, *args: str):
    result = CliRunner().invoke(main, ["export", str(run), "--adapter", "m1", "--out", str(out), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def test_export_merges_into_a_plain_transformers_folder_that_generates(finished_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, _ = finished_run
    out = tmp_path / "m1-merged"
    _export(run, out)  # default: bf16
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    assert tok.chat_template and "### Assistant:" in tok.chat_template
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the color of the king?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids["input_ids"].shape[1]  # it generates (that its logits are base + adapter: the next test)
    assert "m1" in (out / "README.md").read_text()


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path_factory):
    """The dequantized base lands in this module's own cache, written by its first export."""
    monkeypatch.setenv("MINIBT_CACHE", str(tmp_path_factory.getbasetemp() / "export-cache"))


def test_the_merged_weights_are_the_nf4_base_plus_adapter(finished_run, tmp_path):
    """The run trained m1 on its 4-bit base: the export is that base (dequantized) + m1, computing what the
    run's engine computes with m1, not what the original 16-bit weights + m1 compute."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from minibt.engine import load_base
    from minibt.recipe import ModelSection

    _, run, _ = finished_run
    base_dir = json.loads((run / "manifest.json").read_text())["base_model"]
    out = tmp_path / "m1-fp32"
    _export(run, out, "--dtype", "float32")
    assert "NF4" in (out / "README.md").read_text() and "dequantized" in (out / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out)
    nf4, _ = load_base(ModelSection(name=base_dir, quantization="nf4", max_length=1024))
    x = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        merged_logits = merged(x).logits
        nf4_logits = PeftModel.from_pretrained(nf4, str(run / "adapters" / "m1")).eval()(x).logits
        original = AutoModelForCausalLM.from_pretrained(base_dir)
        original_logits = original(x).logits
        original_peft_logits = PeftModel.from_pretrained(original, str(run / "adapters" / "m1")).eval()(x).logits
    assert torch.allclose(merged_logits, nf4_logits, atol=1e-5)
    assert (merged_logits - original_peft_logits).abs().max() > 1e-2  # the original weights would answer otherwise
    assert not torch.equal(original_logits, merged_logits)
    assert json.loads((run / "manifest.json").read_text())["base_model"] == base_dir  # the run's base stays its own


def test_the_export_answers_as_the_run_does(finished_run, tmp_path):
    """Greedy answers of the merged fp32 folder (no minibt adapter, 16-bit engine) equal the run's m1 on its
    4-bit base, prompt for prompt."""
    from minibt import open_run
    from minibt.engine import Engine
    from minibt.recipe import LoraSection, ModelSection

    _, run, _ = finished_run
    out = tmp_path / "m1-fp32"
    _export(run, out, "--dtype", "float32")
    session = open_run(run, adapters=["m1"])
    things = ["king", "queen", "river", "city", "mountain", "sea", "sky", "tree"]
    questions = [f"What is the color of the {t}?" for t in things[:4]] + [f"Tell me about the {t}." for t in things]
    rendered = [session.prompt(q) for q in questions]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one summation order on both sides: the suite's earlier tests may leave another
    try:
        want = session.engine.generate("m1", rendered, max_new_tokens=12, batch_size=4)
        merged = Engine.load(ModelSection(name=str(out), quantization="none", dtype="float32", max_length=1024), LoraSection(r=4), seed=0)
        got = merged.infer.generate("base", rendered, max_new_tokens=12, batch_size=4)
    finally:
        torch.set_num_threads(threads)
    # W + BA merged is not the same float sum as W x + B(A x): a margin of one near-tie flip of 12;
    # merging into the original weights instead matches none of them
    assert sum(g == w for g, w in zip(got, want)) >= len(want) - 1, list(zip(got, want))


def test_export_refuses_to_overwrite_and_names_unknown_adapters(finished_run, tmp_path):
    _, run, _ = finished_run
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    runner = CliRunner()
    result = runner.invoke(main, ["export", str(run), "--adapter", "m1", "--out", str(tmp_path / "full")])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(main, ["export", str(run), "--adapter", "m7", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "adapter 'm7' does not exist" in result.output


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id, kw)))

    def upload_folder(*, repo_id, folder_path, **kw):
        calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_the_merged_folder(finished_run, tmp_path, fake_hub):
    _, run, _ = finished_run
    result = _export(run, tmp_path / "m", "--push-to-hub", "someone/tiny-m1", "--private")
    assert "pushed it to someone/tiny-m1" in result.output
    (create, upload) = fake_hub
    assert create[:2] == ("create", "someone/tiny-m1") and create[2]["private"] is True and create[2]["exist_ok"] is True
    assert upload[:2] == ("upload", "someone/tiny-m1")
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"} <= set(upload[2])
    assert "chat_template.jinja" in upload[2] or "chat_template" in (tmp_path / "m" / "tokenizer_config.json").read_text()


def test_push_to_hub_uploads_the_adapter_folder(finished_run, fake_hub):
    _, run, _ = finished_run
    result = CliRunner().invoke(main, ["export", str(run), "--adapter", "m1", "--adapter-only", "--push-to-hub", "someone/tiny-m1-lora"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    (_, upload) = fake_hub
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(upload[2])
    assert "model.safetensors" not in upload[2]
