"""EmberError's two audiences (`public` for an API client, str() for the log and the
CLI), and which failed starts a retry can fix (is_permanent), by the error's type."""

from __future__ import annotations

import errno

import pytest

from ember.errors import (
    CheckpointNotFoundError,
    CorruptCacheCopyError,
    CorruptCheckpointError,
    EmberError,
    FormatVersionError,
    MissingWeightError,
    NodeFailedError,
    OverloadedError,
    RegistryError,
    RegistryUnavailableError,
    StorageFullError,
    UnsupportedModelError,
    is_permanent,
    redact,
)


def test_the_detail_is_in_the_whole_text_and_not_in_the_public_one() -> None:
    exc = CorruptCheckpointError(
        "checksum mismatch in part-00000.bin at bytes [0, 4096)",
        detail="/home/someone/.ember/store/m/part-00000.bin",
    )
    assert exc.public == "checksum mismatch in part-00000.bin at bytes [0, 4096)"
    assert str(exc) == f"{exc.message} (/home/someone/.ember/store/m/part-00000.bin)"
    assert "/home" not in exc.public and exc.status == 422


def test_a_wrapped_error_keeps_no_path_or_credentials_for_the_client() -> None:
    inner = RegistryError("checksum mismatch in part-00000.bin", detail="https://bob:s3cret@reg.internal/m/p")
    outer = OverloadedError(f"the server failed to start: {inner}")
    assert "s3cret" in str(outer) and "reg.internal" in str(outer)
    assert outer.public == "the server failed to start: checksum mismatch in part-00000.bin (p)"


@pytest.mark.parametrize(
    ("text", "public"),
    [
        ("no checkpoint directory at /home/u/.ember/store/m", "no checkpoint directory at m"),
        ("/srv/ember/store/m/index.json: not valid JSON", "index.json: not valid JSON"),
        ("cannot read '/data/x y/model.gguf'", "cannot read 'model.gguf'"),
        ("see ~/.ember/store/ and ./ckpt/part-00000.bin", "see store and part-00000.bin"),
        ("no registry at https://user:pw@host:8443", "no registry at <hidden>"),
        ("answered 404 for http://h/reg/m/index.json?sig=abc", "answered 404 for index.json"),
        # No path in these: they pass unchanged.
        ("no registry is configured (--registry / EMBER_REGISTRY)", None),
        ("the checkpoint of 'org/model' has no readable model/config.json", None),
        ("tensor 'w' has a bad shape/stride at [0, 4096); 1/2 done", None),
    ],
)
def test_redact_cuts_paths_and_urls_to_their_last_part(text: str, public: str | None) -> None:
    assert redact(text) == (text if public is None else public)


def test_an_error_without_detail_reads_the_same_to_everyone() -> None:
    exc = EmberError("the prompt is empty", param="prompt")
    assert str(exc) == exc.message == exc.public == "the prompt is empty"


@pytest.mark.parametrize(
    "error",
    [
        CheckpointNotFoundError("no checkpoint named 'm'"),
        CorruptCheckpointError("index is not valid JSON"),
        FormatVersionError("format version 9"),
        UnsupportedModelError("architecture 'mamba'"),
        MissingWeightError("lm_head.weight"),
        RegistryError("checksum mismatch in the registry's copy"),
        StorageFullError("no space left on device"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
)
def test_no_retry_fixes_a_missing_or_corrupt_checkpoint_or_a_full_disk(error: BaseException) -> None:
    assert is_permanent(error)


@pytest.mark.parametrize(
    "error",
    [
        NodeFailedError("node1 died", node="node1"),
        OverloadedError("no free slot"),
        RegistryUnavailableError("registry answered 503"),
        CorruptCacheCopyError("the node's cached copy was bad; dropped"),
        OSError(errno.EIO, "Input/output error"),
        RuntimeError("something unexpected"),
    ],
)
def test_a_retry_may_fix_anything_else(error: BaseException) -> None:
    assert not is_permanent(error)
