"""`minibt serve --engine vllm` (minibt/vllm_serve.py): vLLM's own OpenAI server for the reduced toy run
(tests/toy/conftest.py), asked with the `openai` client, answers as minibt's vLLM engine does.

The toy base (head_dim 32) is one vLLM's CPU attention serves; conftest's finished tiny run is not
(head_dim 16: vLLM's CPU backend supports 32 and up). One server start (~25-60 s on 2 cores) and one
engine start for the reference answers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from minibt import io

QUESTIONS = 6


@pytest.mark.vllm
def test_vllms_server_answers_with_the_adapter_named_as_minibts_vllm_engine_does(good_run):
    pytest.importorskip("vllm")
    import openai

    from minibt.session import Session

    run = good_run[0]
    asked = [q["instruction"] for q in io.read_jsonl(run / "data" / "eval.jsonl")[:QUESTIONS]]
    session = Session(run, adapters=["m0", "m1"], engine="vllm")
    want = {a: session.generate(asked, adapter=a) for a in ("m0", "m1")}  # greedy, the run's default length
    session.engine.close()
    assert want["m0"] != want["m1"]

    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # the engine's setting, not the server's
    proc = subprocess.Popen([sys.executable, "-m", "minibt.cli", "serve", str(run), "--engine", "vllm", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = next(line for line in proc.stdout if line.startswith("minibt serve: "))
        assert "engine vllm" in line and "bound to 127.0.0.1" in line, line
        url = re.search(r"(http://127\.0\.0\.1:\d+/v1)", line).group(1)
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None and time.time() < deadline, "vLLM's server did not start"
            try:
                if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(2)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        assert sorted(m.id for m in client.models.list()) == sorted(["base", *os.listdir(run / "adapters")])
        for adapter in ("m0", "m1"):
            got = [client.chat.completions.create(model=adapter, messages=[{"role": "user", "content": q}])
                   for q in asked]
            assert [r.choices[0].message.content for r in got] == want[adapter], adapter

        def sample(seed: int) -> str:
            return client.chat.completions.create(model="m1", messages=[{"role": "user", "content": asked[0]}],
                                                  temperature=1.0, seed=seed).choices[0].message.content

        assert sample(7) == sample(7) and len({sample(s) for s in range(4)}) > 1, "a request's seed fixes its sample"
        family = psutil.Process(proc.pid).children(recursive=True)
        assert family, "vLLM's engine runs in processes of its own"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {alive}"
