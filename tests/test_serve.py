"""`minibt serve` on the HF engine (minibt/serve.py) with the real `openai` client, on conftest's finished
tiny run: the adapters answer as `Session.generate` does, streamed or not, batched or not; errors in the
protocol's shape; the command stops cleanly on SIGINT and SIGTERM. (vLLM's server for a run:
tests/toy/test_serve_vllm.py, on the toy run vLLM's CPU build can serve.)"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import psutil
import pytest

pytest.importorskip("fastapi", reason="minibt serve's HF server needs the serve extra: pip install 'minibt[serve]'")
import uvicorn  # noqa: E402  (the serve extra's, with fastapi)

from minibt.serve import build_app, cut_at_stop, held_back, listening_socket  # noqa: E402
from minibt.session import Session  # noqa: E402

ASKED = ["What is the color of the king?", "What is the color of the river?", "Tell me about the north.",
         "What is the color of the city?"]


@pytest.fixture(scope="module")
def server(finished_run):
    """(session, base URL): the app on a free port of 127.0.0.1, in a thread of this process."""
    session = Session(finished_run[1], engine="hf")
    sock = listening_socket("127.0.0.1", 0)
    app, worker = build_app(session)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    yield session, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    uv.should_exit = True
    thread.join(timeout=30)
    worker.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1], api_key="unused", max_retries=0)


def chat(client, model: str, question: str, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kw)


def test_models_are_the_runs_adapters_and_base(client):
    assert [m.id for m in client.models.list()] == ["m0", "m1", "myx", "base"]


def test_each_model_answers_as_session_generate_and_switching_the_name_switches_the_adapter(server, client):
    session, _ = server
    answers = {}
    for adapter in ("m0", "m1"):
        want = session.generate(ASKED, adapter=adapter)  # greedy, the run's default length
        got = [chat(client, adapter, q) for q in ASKED]
        assert [r.choices[0].message.content for r in got] == want, adapter
        assert all(r.model == adapter for r in got)
        raw = [client.completions.create(model=adapter, prompt=session.prompt(q)).choices[0].text for q in ASKED]
        assert raw == want, "a completion of the rendered prompt is the chat's answer"
        answers[adapter] = want
    assert answers["m0"] != answers["m1"]
    first = chat(client, "m0", ASKED[0]).choices[0].message.content
    assert first == answers["m0"][0] != chat(client, "m1", ASKED[0]).choices[0].message.content


def test_the_default_length_is_the_runs_and_max_tokens_overrides_it(server, client):
    session, _ = server
    r = chat(client, "m1", ASKED[2], max_tokens=3)
    assert r.choices[0].message.content == session.generate(ASKED[2], adapter="m1", max_new_tokens=3)[0]
    assert r.usage.completion_tokens <= 3 and r.choices[0].finish_reason == "length"
    text = "The king is red."
    myx = client.completions.create(model="myx", prompt=text).choices[0].text
    from minibt.roles import backward_prompt

    prompt = backward_prompt(session.engine.text, text, session.instruction_tokens)
    assert client.completions.create(model="myx", prompt=prompt).choices[0].text == session.backtranslate(text)[0]
    assert myx == session.engine.generate("myx", [text], session.instruction_tokens)[0]


def test_streaming_sends_the_non_streamed_text(client):
    for model in ("m0", "m1"):
        whole = chat(client, model, ASKED[1]).choices[0].message.content
        pieces = [c.choices[0].delta.content for c in chat(client, model, ASKED[1], stream=True) if c.choices and c.choices[0].delta.content]
        assert len(pieces) > 1 and "".join(pieces) == whole, (model, pieces, whole)
    whole = client.completions.create(model="m1", prompt="the king is").choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(model="m1", prompt="the king is", stream=True)]
    assert "".join(pieces) == whole


def test_a_stop_string_ends_the_answer_streamed_or_not(client):
    whole = chat(client, "m1", ASKED[0]).choices[0].message.content
    stop = whole[len(whole) // 2: len(whole) // 2 + 2]
    cut = chat(client, "m1", ASKED[0], stop=[stop])
    assert cut.choices[0].message.content == whole[: whole.index(stop)].strip() and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, "m1", ASKED[0], stop=stop, stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content


def test_a_requests_seed_fixes_its_sample(client):
    def sample(seed: int) -> str:
        return chat(client, "m1", ASKED[0], temperature=1.0, seed=seed).choices[0].message.content

    assert sample(5) == sample(5) and len({sample(s) for s in range(4)}) > 1


def test_stop_strings_are_held_back_only_while_they_may_begin():
    assert cut_at_stop(" a b STOP c ", ["STOP"]) == ("a b", True) and cut_at_stop(" a b ", ["X"]) == ("a b", False)
    assert held_back("a b ST", ["STOP"]) == 2 and held_back("a b", ["STOP"]) == 0


def test_sixteen_concurrent_requests_on_two_adapters_each_get_their_own_answer(server, client, monkeypatch):
    session, _ = server
    asked = [(("m0", "m1")[i % 2], ASKED[i % len(ASKED)]) for i in range(16)]
    want = {a: dict(zip(ASKED, session.generate(ASKED, adapter=a))) for a in ("m0", "m1")}
    calls: list[int] = []
    generate = session.engine.generate

    def recording(adapter, prompts, *args, **kwargs):
        calls.append(len(prompts))
        return generate(adapter, prompts, *args, **kwargs)

    monkeypatch.setattr(session.engine, "generate", recording)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda aq: chat(client, *aq), asked))
    assert [r.choices[0].message.content for r in got] == [want[a][q] for a, q in asked]
    assert [r.model for r in got] == [a for a, _ in asked]
    assert sum(calls) == 16 and max(calls) > 1, f"requests waiting together run as one batch: {calls}"


def test_a_prompt_longer_than_the_context_is_clipped_as_the_engine_clips_it_and_usage_says_so(server, client):
    session, _ = server
    long = " ".join(["the king of the north is red"] * 200)
    r = chat(client, "m1", long, max_tokens=4)
    context = session.recipe.model.max_length
    assert r.usage.clipped_prompt_tokens > 0 and r.usage.prompt_tokens == context - 4
    assert r.choices[0].message.content == session.generate(long, adapter="m1", max_new_tokens=4)[0]
    short = chat(client, "m1", ASKED[0], max_tokens=4)
    assert short.usage.clipped_prompt_tokens == 0


def test_errors_are_the_protocols_and_name_what_is_wrong(server, client):
    with pytest.raises(openai.NotFoundError, match=r"'m9' is not served here; served: m0, m1, myx, base") as e:
        chat(client, "m9", "hi")
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    for kwargs, param in [({"temperature": -1}, "temperature"), ({"n": 2}, "n"), ({"logprobs": True}, "logprobs")]:
        with pytest.raises(openai.BadRequestError) as e:
            chat(client, "m0", "hi", **kwargs)
        assert e.value.body["param"] == param and e.value.body["message"].startswith(f"{param}: "), e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m0", messages=[{"role": "user"}])
    assert e.value.body["param"] == "messages.0.content"
    url = server[1]
    bad = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"message", "type", "param", "code"}
    missing = httpx.post(f"{url}/completions", json={"model": "m0"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    assert chat(client, "m0", ASKED[0]).choices[0].message.content  # still serving


def start(run, *args: str) -> subprocess.Popen:
    """`minibt serve RUN --port 0 ARGS` in a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "minibt.cli", "serve", str(run), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ready(proc: subprocess.Popen) -> str:
    """The base URL the startup line names, once the server is up."""
    for line in proc.stdout:
        if line.startswith("minibt serve: "):
            assert "engine hf" in line and "models m0, m1, myx, base" in line and "bound to 127.0.0.1: this machine only" in line
            return re.search(r"(http://127\.0\.0\.1:\d+/v1)", line).group(1)
    raise AssertionError(f"no startup line; stderr: {proc.stderr.read()}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_command_answers_with_a_key_and_stops_cleanly_on_a_signal(finished_run, sig):
    """One at a time: two starts at once took longer than both in turn on 2 cores."""
    proc = start(finished_run[1], "--api-key", "s3cret")
    try:
        url = ready(proc)
        with pytest.raises(openai.AuthenticationError, match="API key"):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/models").status_code == 401  # no key at all
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0)
        assert chat(client, "m1", ASKED[0], max_tokens=2).choices[0].message.content is not None
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert out.strip().endswith("minibt serve: stopped") and "Traceback" not in err, err
    assert not [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    listening_socket("127.0.0.1", port).close()  # the port is free again


def test_vllms_command_line_serves_the_runs_adapters_on_the_weights_they_trained_against(server, finished_run, monkeypatch,
                                                                                         tmp_path):
    """What `minibt serve --engine vllm` hands vLLM's server, without starting it (tests/toy/test_serve_vllm.py
    starts it): the dequantized NF4 base with minibt's tokenizer, every adapter as a LoRA module, the run's
    defaults, and a chat template that renders the token ids the run's own engine reads."""
    import json

    from minibt.engine.dequantize import dequantized_base
    from minibt.rundir import RunDir
    from minibt.vllm_serve import command, flags, served_template

    monkeypatch.setenv("MINIBT_CACHE", str(tmp_path))
    run = RunDir.open(finished_run[1])
    argv, served = command(run, "127.0.0.1", 8123, "k3y")
    assert served == ["m0", "m1", "myx", "base"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    model_cfg = run.recipe().model
    assert value("--model") == value("--tokenizer") == dequantized_base(model_cfg) != model_cfg.name
    assert argv[argv.index("--lora-modules") + 1:][:3] == [f"{a}={run.adapter(a).resolve()}" for a in ("m0", "m1", "myx")]
    assert value("--served-model-name") == "base" and value("--api-key") == "k3y" and value("--port") == "8123"
    assert "--enable-lora" in argv and "--worker-extension-cls" not in argv
    session = server[0]
    assert json.loads(value("--override-generation-config")) == {"temperature": 0.0, "max_new_tokens": session.answer_tokens}
    tokenizer = session.engine.text.tokenizer
    messages = [{"role": "user", "content": ASKED[0]}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=value("--chat-template"), tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == session.chat_prompt(messages)  # this tokenizer adds no BOS when it encodes
    assert served_template("T", None, bos=True) == "{{- bos_token -}}T" and served_template("T", None, bos=False) == "T"
    assert flags({"a_b": True, "c": False, "d": None, "e": [1, 2], "f": 3}) == ["--a-b", "--no-c", "--e", "1", "2", "--f", "3"]
