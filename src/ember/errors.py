"""Every error a user of Ember can cause, in one tree.

EmberError                      base; carries an HTTP status for the server
├── InvalidRequestError         400: a bad argument or field
│   ├── UnsupportedFeatureError 400: a field Ember does not implement
│   └── ContextLengthError      400: a prompt that does not fit the model's context
├── AuthenticationError         401
├── NotFoundError               404
│   ├── ModelNotFoundError      404: no deployment or checkpoint of that name
│   └── CheckpointNotFoundError 404: no checkpoint at that name or path
├── MethodNotAllowedError       405: an HTTP method a route does not take
├── ConflictError               409
│   ├── CheckpointExistsError   409: a checkpoint of that name is already stored
│   └── PortInUseError          409: `ember serve` on a port something else listens on
├── PayloadTooLargeError        413
├── OverloadedError             503: queue full or no instance in time (Retry-After)
│   ├── EngineDeadError         503: an engine's thread stopped; its requests end, new ones are refused
│   ├── NodeFailedError         503: a node died or stopped answering; its requests move on
│   │   └── InstanceFailedError 503: one instance of a node died (its engine thread); its requests move on
│   └── ClusterStateError       503: the control plane's database failed (locked, I/O); nothing changed
├── CheckpointError             422: a checkpoint on disk is unusable
│   ├── CorruptCheckpointError  422: checksum mismatch, truncated file, bad bounds
│   │   └── CorruptCacheCopyError 422: a node's cached copy was bad and is dropped; a retry refetches
│   ├── FormatVersionError      422: index written by an unknown format version
│   ├── UnsupportedDtypeError   422: a dtype the format cannot hold
│   ├── UnsupportedModelError   422: an architecture or config option the engine cannot run
│   └── MissingWeightError      422: a tensor the architecture needs is not in the checkpoint
├── RegistryError               502: the remote registry failed or sent bad bytes
│   └── RegistryUnavailableError 502: it failed part-way (5xx, connection lost); a retry resumes
├── InternalError               500: something inside Ember failed serving one request; the server goes on
├── MissingDependencyError      500: an optional package is not installed (says how)
├── StorageFullError            507: no space left while writing
└── StartFailedError            503: a model that cannot start, for a reason no retry can fix

What a client may read and what only the server's operator may: `message` says what
went wrong in words fit for an API client; `detail` carries the specifics that belong
to the server (a path under EMBER_HOME, a registry URL). `str(exc)` has both, for the
log and for the local CLI; the server sends `exc.public`, the message with any path or
URL still in it (one quoted from a wrapped error, say) cut to its last part.

A failed start of an instance is retried (with a backoff) unless `is_permanent`
says no retry can fix it: a missing or corrupt checkpoint, a full disk, a bad
setting. The classification is by type, here, next to the tree it reads.
"""

from __future__ import annotations

import errno
import re

# A URL, or an absolute, home or dot-relative path: a quoted one to its closing quote
# (spaces and all), a bare one to the next space, quote, bracket or separator.
_LOCATION = re.compile(
    r"\b[a-z][a-z0-9+.-]*://[^\s'\"()<>\[\]]*"  # a URL, userinfo and query included
    r"|(?<=['\"])(?:~|\.{1,2})?/[^'\"\n]+(?=['\"])"  # '/a b/c'
    r"|(?<![\w.~/-])(?:~|\.{1,2})?/[^\s'\"()<>\[\],;:]+",  # /a/b, ~/a, ./a, ../a
    re.IGNORECASE,
)


def _last_part(match: re.Match[str]) -> str:
    text = match.group(0)
    if "://" in text:  # keep neither the host nor credentials: only a path's last part
        text = text.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
        if "/" not in text.strip("/"):
            return "<hidden>"
    return text.rstrip("/").rsplit("/", 1)[-1] or "<hidden>"


def redact(text: str) -> str:
    """`text` with every filesystem path and URL in it cut to its last part
    ("/home/u/.ember/store/m/part-00000.bin" -> "part-00000.bin"), hosts and
    credentials dropped."""
    return _LOCATION.sub(_last_part, text)


def public_text(exc: BaseException) -> str:
    """What a client may read of any exception: an EmberError's `public`, else its
    text with paths and URLs redacted."""
    return exc.public if isinstance(exc, EmberError) else redact(str(exc))


class EmberError(Exception):
    """Base class. `status` is the HTTP status the server answers with; `message` is
    fit for a client, `detail` (paths, URLs) for the log and the local CLI only."""

    status: int = 500
    type: str = "internal_error"

    def __init__(
        self, message: str, *, param: str | None = None, detail: str | None = None, verbatim: bool = False
    ) -> None:
        super().__init__(f"{message} ({detail})" if detail else message)
        self.message = message
        self.param = param
        self.detail = detail
        self.verbatim = verbatim  # the message quotes only the client's own request (its route)

    @property
    def public(self) -> str:
        """What the server sends a client: the message, any path left in it redacted
        (unless `verbatim`: a route the client asked for is not a server path)."""
        return self.message if self.verbatim else redact(self.message)


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


class MethodNotAllowedError(EmberError):
    status = 405
    type = "invalid_request_error"


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


class ClusterStateError(OverloadedError):
    """The control plane's SQLite database failed a read or a write (disk I/O error,
    database locked). A failed write changed nothing, in the database or in memory;
    the same call may succeed later (503, retry)."""


class EngineDeadError(OverloadedError):
    """An engine's thread stopped after an error it could not contain: the requests it
    ran end with this, later ones are refused at once. The control plane stops the
    instance and resumes its requests elsewhere (as InstanceFailedError)."""

    def __init__(self, message: str, *, retry_after_s: float = 5.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class InstanceFailedError(NodeFailedError):
    """One instance of a node failed (its engine thread died) while the node lives on:
    the controller stops that instance and resumes its requests on another, as after a
    node failure, without marking the node down."""

    def __init__(self, message: str, *, node: str | None = None, instance: str | None = None) -> None:
        super().__init__(message, node=node)
        self.instance = instance


class InternalError(EmberError):
    """An unexpected error (a bug) while serving one request: that request ends with a
    500 in OpenAI's shape (or an error event on its stream); the server serves on."""

    status = 500
    type = "internal_error"


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
