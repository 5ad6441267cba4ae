"""Which failed starts a retry can fix (is_permanent), by the error's type."""

from __future__ import annotations

import errno

import pytest

from ember.errors import (
    CheckpointNotFoundError,
    CorruptCacheCopyError,
    CorruptCheckpointError,
    FormatVersionError,
    MissingWeightError,
    NodeFailedError,
    OverloadedError,
    RegistryError,
    RegistryUnavailableError,
    StorageFullError,
    UnsupportedModelError,
    is_permanent,
)


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
