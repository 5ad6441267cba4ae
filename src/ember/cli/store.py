"""`ember store`: import, list, remove, verify, push and pull checkpoints; reclaim what
interrupted work left behind (gc)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from ember.cli.base import EmberTyper
from ember.cli.output import JsonOption, byte_progress, human_bytes, print_json, print_table, stage_progress
from ember.errors import CheckpointError, CheckpointExistsError, InvalidRequestError, UnsupportedFeatureError

if TYPE_CHECKING:
    from ember.store.local import LocalStore
    from ember.store.registry import Registry
    from ember.store.scratch import Scratch

store_app = EmberTyper(help="Manage the checkpoints in the local store.")


def _store() -> LocalStore:
    from ember.store.local import LocalStore  # the catalogue's SQLite: only for the commands that read it

    return LocalStore()


def _quiet_transformers() -> None:
    # Our own progress bar replaces transformers' tqdm bars and its load-time chatter.
    import os

    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantiser's bar is a plain tqdm
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _name_from(src: Path) -> str:
    stem = src.stem if src.is_file() else src.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._").lower()[:128] or "model"


@store_app.command("import")
def import_cmd(
    src: Annotated[
        Path | None,
        typer.Argument(help="A Hugging Face safetensors directory or a .gguf file (default: SmolLM2-135M)."),
    ] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Name in the store.")] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Convert floating tensors: float32, bfloat16 or float16.")
    ] = None,
    as_json: bool = JsonOption,
) -> None:
    """Import a model into the store (converted once into Ember's loading format)."""
    # The bar opens first: importing transformers and torch takes seconds by itself.
    with stage_progress({}, enabled=not as_json) as progress:  # stages name themselves
        _quiet_transformers()
        from ember.store.importer import DEFAULT_MODEL_NAME, default_model_source, import_checkpoint

        if src is None:
            src, name = default_model_source(), name or DEFAULT_MODEL_NAME
        name = name or _name_from(src)
        result = import_checkpoint(src, name, dtype=dtype, progress=progress)  # type: ignore[arg-type]
    if as_json:
        print_json(
            {
                "name": result.name,
                "path": str(result.path),
                "size": result.nbytes,
                "dtype": result.dtype,
                "tensors": result.tensors,
                "source": result.source,
            }
        )
    else:
        typer.echo(
            f"imported {result.name}: {result.tensors} tensors, {human_bytes(result.nbytes)} "
            f"({result.dtype}) at {result.path}"
        )


def _describe(store: LocalStore) -> list[dict[str, Any]]:
    from ember.store.format import read_index

    tiers: dict[str, list[str]] = {}
    for loc in store.catalog.locations():
        tiers.setdefault(loc.name, []).append(f"{loc.node}:{loc.tier}")
    out = []
    for rec in store.list():
        try:
            meta = dict(read_index(rec.path).metadata)
        except CheckpointError:
            meta = {}
        out.append(
            {
                "name": rec.name,
                "size": rec.size,
                "dtype": meta.get("dtype", ""),
                "architecture": meta.get("architecture", ""),
                "tiers": ["store", *tiers.get(rec.name, [])],
                "path": rec.path,
                "source": rec.source,
                "created": rec.created,
            }
        )
    return out


def _reclaimable(store: LocalStore) -> list[Scratch]:
    from ember.store.scratch import find, scratch_roots

    return [entry for root in scratch_roots(store.home) for entry in find(root)]


def _totals(entries: list[Scratch]) -> dict[str, dict[str, int]]:
    out = {kind: {"count": 0, "size": 0} for kind in ("orphan", "partial")}
    for e in entries:
        out[e.kind]["count"] += 1
        out[e.kind]["size"] += e.size
    return out


def _entries(entries: list[Scratch]) -> list[dict[str, Any]]:
    return [{"path": str(e.path), "kind": e.kind, "size": e.size} for e in entries]


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _note_cleaned(store: LocalStore) -> None:
    if store.cleaned:
        size = human_bytes(sum(e.size for e in store.cleaned))
        what = _plural(len(store.cleaned), "directory", "directories")
        typer.echo(f"removed {size} that interrupted imports or removals left ({what})", err=True)


@store_app.command("ls")
def ls_cmd(as_json: bool = JsonOption) -> None:
    """List stored checkpoints: size and which tiers hold them; then the space that
    `ember store gc` can reclaim."""
    store = _store()
    _note_cleaned(store)
    rows = _describe(store)
    scratch = _reclaimable(store)
    totals = _totals(scratch)
    if as_json:
        print_json(
            {
                "checkpoints": rows,
                "reclaimable": {
                    "orphans": totals["orphan"],
                    "partial": totals["partial"],
                    "paths": _entries(scratch),
                },
            }
        )
        return
    print_table(
        "checkpoints",
        ["name", "size", "dtype", "architecture", "tiers"],
        [
            [r["name"], human_bytes(r["size"]), r["dtype"], r["architecture"], ", ".join(r["tiers"])]
            for r in rows
        ],
    )
    orphans, partial = totals["orphan"], totals["partial"]
    if orphans["count"]:
        typer.echo(
            f"reclaimable: {human_bytes(orphans['size'])} in "
            f"{_plural(orphans['count'], 'orphaned directory', 'orphaned directories')} "
            "(`ember store gc` removes them)"
        )
    if partial["count"]:
        typer.echo(
            f"partial downloads: {human_bytes(partial['size'])} in {partial['count']} "
            "(kept: the next pull resumes them; `ember store gc --partial` removes them)"
        )


@store_app.command("gc")
def gc_cmd(
    partial: Annotated[
        bool, typer.Option("--partial", help="Also remove partial downloads (a pull then starts over).")
    ] = False,
    as_json: bool = JsonOption,
) -> None:
    """Remove what interrupted imports, removals and downloads left under EMBER_HOME.

    Directories of a process still running are kept; partial downloads are kept unless
    --partial is given (the next pull of the checkpoint resumes them)."""
    from ember.store.scratch import remove

    store = _store()
    scratch = _reclaimable(store)
    removed = [*store.cleaned, *remove(scratch, partial=partial)]
    kept = _totals([e for e in scratch if e.kind == "partial" and not partial])["partial"]
    size = sum(e.size for e in removed)
    if as_json:
        print_json({"removed": _entries(removed), "size": size, "kept_partial": kept})
        return
    what = _plural(len(removed), "directory", "directories")
    typer.echo(f"removed {human_bytes(size)} ({what})" if removed else "nothing to remove")
    if kept["count"]:
        typer.echo(
            f"kept {_plural(kept['count'], 'partial download', 'partial downloads')} "
            f"({human_bytes(kept['size'])}): --partial removes them"
        )


@store_app.command("rm")
def rm_cmd(name: Annotated[str, typer.Argument(help="Checkpoint name.")]) -> None:
    """Remove a checkpoint from the store."""
    rec = _store().remove(name)
    typer.echo(f"removed {rec.name} ({human_bytes(rec.size)})")


@store_app.command("verify")
def verify_cmd(
    target: Annotated[str, typer.Argument(help="A checkpoint name or a checkpoint directory.")],
    as_json: bool = JsonOption,
) -> None:
    """Read every byte of a checkpoint and check it against its checksums."""
    from ember.store.checksum import verify_checkpoint

    path = _store().resolve(target)
    index = verify_checkpoint(path)
    if as_json:
        print_json({"path": str(path), "ok": True, "size": index.total_bytes, "files": len(index.files)})
    else:
        typer.echo(
            f"ok: {path}: {len(index.partitions)} partition(s), {len(index.files)} file(s), "
            f"{human_bytes(index.total_bytes)} verified"
        )


def _registry(location: str | None) -> Registry:
    from ember.env import EMBER_REGISTRY, registry_location

    where = location or registry_location()
    if not where:
        raise InvalidRequestError(f"no registry: pass --registry or set {EMBER_REGISTRY}", param="registry")
    try:
        from ember.store.registry import open_registry
    except ImportError as exc:
        raise UnsupportedFeatureError("this Ember has no registry support (ember.store.registry)") from exc
    return open_registry(where)


@contextmanager
def _closing(reg: Registry) -> Iterator[Registry]:
    try:
        yield reg
    finally:
        close = getattr(reg, "close", None)  # HTTP registries hold a connection pool
        if callable(close):
            close()


RegistryOption = typer.Option(
    "--registry", "-r", help="A directory or http(s) URL (default: $EMBER_REGISTRY)."
)


@store_app.command("push")
def push_cmd(
    name: Annotated[str, typer.Argument(help="Checkpoint name.")],
    registry: Annotated[str | None, RegistryOption] = None,
) -> None:
    """Upload a stored checkpoint to the remote registry."""
    store = _store()
    rec = store.require(name)
    with _closing(_registry(registry)) as reg:
        reg.push(Path(rec.path), name)
    typer.echo(f"pushed {name} ({human_bytes(rec.size)})")


@store_app.command("pull")
def pull_cmd(
    source: Annotated[str, typer.Argument(help="A checkpoint name in the registry, or an http(s) URL.")],
    registry: Annotated[str | None, RegistryOption] = None,
    name: Annotated[str | None, typer.Option("--name", "-n", help="Name in the local store.")] = None,
    as_json: bool = JsonOption,
) -> None:
    """Download a checkpoint from the registry (or a URL) into the store."""
    is_url = source.startswith(("http://", "https://"))
    target = name or (source.rstrip("/").rsplit("/", 1)[-1] if is_url else source)
    store = _store()
    dest = store.path_for(target)
    if store.exists(target) or dest.exists():
        raise CheckpointExistsError(f"a checkpoint named {target!r} is already stored")
    with byte_progress(f"pulling {target}", enabled=not as_json) as progress:
        if is_url:
            try:
                from ember.store.registry import fetch_url
            except ImportError as exc:
                raise UnsupportedFeatureError(
                    "this Ember has no registry support (ember.store.registry)"
                ) from exc
            fetch_url(source, dest, progress=progress)
        else:
            with _closing(_registry(registry)) as reg:
                reg.fetch(source, dest, progress=progress)
    rec = store.register(target, source)
    if as_json:
        print_json({"name": rec.name, "path": rec.path, "size": rec.size, "source": source})
    else:
        typer.echo(f"pulled {rec.name} ({human_bytes(rec.size)}) into {rec.path}")
