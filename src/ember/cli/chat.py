"""`ember chat`: talk to a model, streaming, against a server or embedded."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer

from ember import env
from ember.errors import ContextLengthError, ModelNotFoundError

MIN_ANSWER_TOKENS = 32  # forget old turns rather than leave the answer less room than this


Turn = Callable[[list[dict[str, str]]], Iterator[str]]  # messages -> streamed answer pieces
# OpenAI's sampling fields, the same for a server and embedded: temperature, top_p, seed.
Sampling = dict[str, Any]


def _server_turns(
    url: str, model: str | None, api_key: str | None, sampling: Sampling
) -> tuple[str, Turn, Callable[[], None]]:
    from ember.cli.openai_http import ChatClient

    client = ChatClient(url, api_key)
    try:
        names = client.models()
        chosen = model or (names[0] if names else None)
        if chosen is None or chosen not in names:
            raise ModelNotFoundError(f"the server at {url} does not serve {chosen!r} (it serves {names})")
    except BaseException:
        client.close()
        raise
    name: str = chosen
    return name, lambda messages: client.stream_chat(name, messages, sampling), client.close


def _embedded_turns(model: str | None, sampling: Sampling) -> tuple[str, Turn, Callable[[], None]]:
    import asyncio
    import uuid

    from ember.cli.output import stage_progress
    from ember.engine.async_engine import AsyncEngine
    from ember.engine.request import EngineRequest, SamplingParams
    from ember.store.importer import ensure_default_model
    from ember.store.local import LocalStore

    store = LocalStore()
    if model is None:
        with stage_progress({}) as progress:  # the first run imports the default model
            model = ensure_default_model(store, progress=progress)
    name = model
    engine = AsyncEngine.from_checkpoint(store.resolve(name))
    tokenizer: Any = engine.engine.tokenizer
    loop = asyncio.new_event_loop()

    def turn(messages: list[dict[str, str]]) -> Iterator[str]:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
        room = engine.engine.max_model_len - len(ids)
        if room < MIN_ANSWER_TOKENS:
            raise ContextLengthError(
                f"the conversation is {len(ids)} tokens; the context holds {engine.engine.max_model_len}"
            )
        params = SamplingParams(max_tokens=min(512, room), **sampling)

        async def first() -> Any:
            return engine.submit(EngineRequest.make(uuid.uuid4().hex, ids, params))

        stream = loop.run_until_complete(first())
        while True:
            try:
                out = loop.run_until_complete(stream.__anext__())
            except StopAsyncIteration:
                return
            yield out.outputs[0].text

    def close() -> None:
        engine.shutdown()
        loop.close()

    return name, turn, close


def chat_cmd(
    model: Annotated[str | None, typer.Argument(help="Model id (default: the server's first).")] = None,
    url: Annotated[
        str | None, typer.Option(help=f"Server URL (or {env.EMBER_URL}). [default: {env.DEFAULT_URL}]")
    ] = None,
    embedded: Annotated[bool, typer.Option(help="Run the model in this process, no server.")] = False,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    temperature: Annotated[
        float, typer.Option(min=0.0, max=2.0, help="Sampling temperature; 0 answers greedily.")
    ] = 0.7,
    top_p: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Sample from the most likely tokens holding this mass.")
    ] = 0.9,
    seed: Annotated[
        int | None, typer.Option(help="Make the answers reproducible (default: fresh randomness).")
    ] = None,
) -> None:
    """Chat with a model, streaming its answers. Reads standard input line by line
    when it is not a terminal (each line a user turn) and exits at its end."""
    api_key = os.environ.get(env.EMBER_API_KEY)
    sampling: Sampling = {"temperature": temperature, "top_p": top_p}
    if seed is not None:
        sampling["seed"] = seed
    if embedded:
        name, turn, close = _embedded_turns(model, sampling)
    else:
        name, turn, close = _server_turns(env.server_url(url), model, api_key, sampling)
    try:
        _converse(name, turn, system)
    finally:
        close()


def _converse(name: str, turn: Turn, system: str | None) -> None:
    interactive = sys.stdin.isatty()
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if interactive:
        typer.echo(f"Chatting with {name}. Ctrl-D to quit.", err=True)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):
            break
        if not interactive and not line:
            break  # end of input
        line = line.strip()
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        answer = _answer(turn, messages)
        if answer is not None:
            messages.append({"role": "assistant", "content": answer})


def _answer(turn: Turn, messages: list[dict[str, str]]) -> str | None:
    """Stream the answer to the last message. When the conversation no longer fits the
    context, the oldest turns are forgotten; a single message too long is refused
    (and dropped) with a clear error, and the chat goes on."""
    while True:
        try:
            pieces = []
            for piece in turn(messages):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            return "".join(pieces)
        except ContextLengthError as exc:
            first = 1 if messages[0]["role"] == "system" else 0
            if len(messages) - first > 1:
                del messages[first : first + 2]  # the oldest user turn and its answer
                continue
            messages.pop()
            typer.echo(f"error: {exc.message}", err=True)
            return None
