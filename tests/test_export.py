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


def test_the_merged_weights_are_base_plus_adapter(finished_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, run, _ = finished_run
    base_dir = json.loads((run / "manifest.json").read_text())["base_model"]
    out = tmp_path / "m1-fp32"
    _export(run, out, "--dtype", "float32")
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    x = torch.tensor([[1, 5, 9, 20, 33]])
    with torch.no_grad():
        base_logits = base(x).logits
        peft_logits = PeftModel.from_pretrained(base, str(run / "adapters" / "m1")).eval()(x).logits
        merged_logits = merged(x).logits
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4)
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[key], AutoModelForCausalLM.from_pretrained(base_dir).state_dict()[key])
    assert not torch.equal(base_logits, merged_logits)


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
