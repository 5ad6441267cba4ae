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
│   ├── EngineDeadError         503: an engine's thread stopped; its requests end, new ones are refused
│   └── NodeFailedError         503: a node died or stopped answering; its requests move on
│       └── InstanceFailedError 503: one instance of a node died (its engine thread); its requests move on
├── CheckpointError             422: a checkpoint on disk is unusable
│   ├── CorruptCheckpointError  422: checksum mismatch, truncated file, bad bounds
│   ├── FormatVersionError      422: index written by an unknown format version
│   ├── UnsupportedDtypeError   422: a dtype the format cannot hold
│   ├── UnsupportedModelError   422: an architecture or config option the engine cannot run
│   └── MissingWeightError      422: a tensor the architecture needs is not in the checkpoint
├── RegistryError               502: the remote registry failed or sent bad bytes
│   └── RegistryUnavailableError 502: it failed part-way (5xx, connection lost); a retry resumes
├── InternalError               500: something inside Ember failed serving one request; the server goes on
├── MissingDependencyError      500: an optional package is not installed (says how)
└── StorageFullError            507: no space left while writing
"""

from __future__ import annotations


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
