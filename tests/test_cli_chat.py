"""What `minibt chat` and the other commands show in a terminal: a wrong adapter name keeps the
conversation; bitsandbytes' note about an optional CPU kernel stays out of sight."""

from __future__ import annotations

import subprocess
import sys

import pytest
from click.testing import CliRunner

from minibt.cli import main
from minibt.session import Session

BNB_NOTE = "Failed to load CPU gemm_4bit_forward from kernels-community"


def test_an_adapter_not_in_the_run_is_one_line_and_the_chat_goes_on(finished_run, monkeypatch):
    _, run, _ = finished_run
    answered_by = []
    stream = Session.stream

    def recording(self, history, adapter, *args, **kwargs):  # real generation; remember who answered
        answered_by.append((adapter, len(history)))
        return stream(self, history, adapter, *args, **kwargs)

    monkeypatch.setattr(Session, "stream", recording)
    typed = "hello\n/adapter m9\nand again\n/adapter m1\na third time\n/exit\n"
    result = CliRunner().invoke(main, ["chat", str(run), "--adapter", "m0", "--max-new-tokens", "3"], input=typed)
    assert result.exit_code == 0, result.output + repr(result.exception)
    refusals = [line for line in result.output.splitlines() if "'m9'" in line]
    assert len(refusals) == 1 and "does not exist" in refusals[0] and refusals[0].endswith("still talking to m0")
    assert "now talking to m1" in result.output
    # the history survived the refusal: the second and third turns see the earlier ones
    assert answered_by == [("m0", 1), ("m0", 3), ("m1", 5)]


def test_bitsandbytes_cpu_kernel_note_stays_out_of_a_commands_output(finished_run):
    """A fresh process (bitsandbytes prints the note once, when first imported): where a bare import
    prints it, `minibt chat` (which loads the 4-bit base) must not."""
    _, run, _ = finished_run
    bare = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, timeout=300)
    if BNB_NOTE not in bare.stdout + bare.stderr:
        pytest.skip("this machine's bitsandbytes prints no such note (it has the kernels package or no AVX512-BF16)")
    chat = subprocess.run([sys.executable, "-m", "minibt.cli", "chat", str(run), "--adapter", "m0"], input="/exit\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    assert "adapters in this run: " in chat.stdout  # the base and the adapter did load
    assert BNB_NOTE not in chat.stdout + chat.stderr
