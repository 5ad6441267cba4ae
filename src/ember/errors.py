"""Every error a user of Ember can cause, in one tree.

EmberError                      base; carries an HTTP status for the server
├── InvalidRequestError         400: a bad argument or field
│   ├── UnsupportedFeatureError 400: a field Ember does not implement
│   └── ContextLengthError      400: a prompt that does not fit the model's context
├── AuthenticationError         401
├── NotFoundError               404
│   ├── ModelNotFoundError      404: no deployment or checkpoint of that name
│   └── CheckpointNotFoundError 404: no checkpoint at that name or path
├── ConflictError               409
│   ├── CheckpointExistsError   409: a checkpoint of that name is already stored
│   └── PortInUseError          409: `ember serve` on a port something else listens on
├── PayloadTooLargeError        413
├── OverloadedError             503: queue full or no instance in time (Retry-After)
│   └── NodeFailedError         503: a node died or stopped answering; its requests move on
├── CheckpointError             422: a checkpoint on disk is unusable
│   ├── CorruptCheckpointError  422: checksum mismatch, truncated file, bad bounds
│   │   └── CorruptCacheCopyError 422: a node's cached copy was bad and is dropped; a retry refetches
│   ├── FormatVersionError      422: index written by an unknown format version
│   ├── UnsupportedDtypeError   422: a dtype the format cannot hold
│   ├── UnsupportedModelError   422: an architecture or config option the engine cannot run
│   └── MissingWeightError      422: a tensor the architecture needs is not in the checkpoint
├── RegistryError               502: the remote registry failed or sent bad bytes
│   └── RegistryUnavailableError 502: it failed part-way (5xx, connection lost); a retry resumes
├── MissingDependencyError      500: an optional package is not installed (says how)
├── StorageFullError            507: no space left while writing
└── StartFailedError            503: a model that cannot start, for a reason no retry can fix

A failed start of an instance is retried (with a backoff) unless `is_permanent`
says no retry can fix it: a missing or corrupt checkpoint, a full disk, a bad
setting. The classification is by type, here, next to the tree it reads.
"""

from __future__ import annotations

import errno


class EmberError(Exception):
    """Base class. `status` is the HTTP status the server answers with."""

    status: int = 500
    type: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(EmberError):
    status = 400
    type = "invalid_request_error"


class UnsupportedFeatureError(InvalidRequestError):
    pass


class ContextLengthError(InvalidRequestError):
    pass


class AuthenticationError(EmberError):
    status = 401
    type = "authentication_error"


class NotFoundError(EmberError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    pass


class CheckpointNotFoundError(NotFoundError):
    pass


class ConflictError(EmberError):
    status = 409
    type = "conflict_error"


class CheckpointExistsError(ConflictError):
    pass


class PortInUseError(ConflictError):
    pass


class PayloadTooLargeError(EmberError):
    status = 413
    type = "invalid_request_error"


class OverloadedError(EmberError):
    status = 503
    type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NodeFailedError(OverloadedError):
    """A node of the cluster died or stopped answering. The controller resumes the
    node's requests elsewhere from their tokens; only when no node can take them does a
    client see this error (503, retry later)."""

    def __init__(self, message: str, *, node: str | None = None, retry_after_s: float = 5.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.node = node


class CheckpointError(EmberError):
    status = 422
    type = "checkpoint_error"


class CorruptCheckpointError(CheckpointError):
    pass


class CorruptCacheCopyError(CorruptCheckpointError):
    """A node's cached copy (not the source) failed its checksums; the node dropped it,
    so the next start fetches a fresh one: a failure a retry can fix."""


class FormatVersionError(CheckpointError):
    pass


class UnsupportedDtypeError(CheckpointError):
    pass


class UnsupportedModelError(CheckpointError):
    pass


class MissingWeightError(CheckpointError):
    pass


class RegistryError(EmberError):
    status = 502
    type = "registry_error"


class RegistryUnavailableError(RegistryError):
    """A transient failure: the partial copy is kept, and the next fetch resumes it."""


class MissingDependencyError(EmberError):
    status = 500
    type = "missing_dependency"


class StorageFullError(EmberError):
    status = 507
    type = "storage_full"


class StartFailedError(EmberError):
    """A model that cannot start, for a reason no retry can fix: `ember serve` exits
    with it when one of its `--model`s fails so."""

    status = 503
    type = "start_failed"


# Failures of a start that no retry can fix (RETRYABLE lists the exceptions among them).
PERMANENT: tuple[type[EmberError], ...] = (
    CheckpointNotFoundError,  # nothing of that name in the store or the registry
    CheckpointError,  # corrupt, unknown format version, unsupported model or dtype
    RegistryError,  # the registry sent bad bytes or refused (4xx)
    StorageFullError,
    MissingDependencyError,
    InvalidRequestError,  # a setting the engine cannot run with
)
RETRYABLE: tuple[type[EmberError], ...] = (RegistryUnavailableError, CorruptCacheCopyError)
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_permanent(exc: BaseException) -> bool:
    """Whether a failed start would fail the same way however often it were retried.
    Anything else (a node that died, no free slot, a registry that is down, an
    unexpected exception) is worth a retry."""
    if isinstance(exc, RETRYABLE):
        return False
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return True  # a full disk that no Ember code turned into StorageFullError
    return isinstance(exc, PERMANENT)
