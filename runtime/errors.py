"""Every error kiln raises on purpose, defined once.

Each class carries the process exit code the CLI uses and the gRPC status name the server
maps it to, so the mapping lives here and nowhere else.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of kiln's expected failures: a message a person can act on."""

    exit_code = 1
    grpc_status = "INTERNAL"
    http_status: int | None = None  # where HTTP has a status of its own for it; else the gRPC code's


class InvalidInput(KilnError, ValueError):
    """A caller passed something kiln cannot run (empty text, wrong type, mismatched pairs)."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class InvalidInputType(InvalidInput, TypeError):
    """An input of the wrong Python type (None, bytes, a number)."""


class InputTooLong(InvalidInput):
    """Text longer than the model's limit while truncation is off."""


class ModelNotFound(KilnError):
    """The model id or directory could not be resolved (offline cache miss, typo, missing dir)."""

    exit_code = 3
    grpc_status = "NOT_FOUND"


class NotAModel(KilnError):
    """A directory exists but holds no loadable Hugging Face model."""

    exit_code = 3
    grpc_status = "INVALID_ARGUMENT"


class UnsupportedModel(KilnError):
    """An architecture or task kiln does not export, or a task that does not match the head."""

    exit_code = 4
    grpc_status = "INVALID_ARGUMENT"


class OutputError(KilnError):
    """The output location exists (without --force) or cannot be written."""

    exit_code = 5
    grpc_status = "FAILED_PRECONDITION"


class CalibrationError(KilnError):
    """The calibration/validation text file is missing, empty or unreadable."""

    exit_code = 6
    grpc_status = "INVALID_ARGUMENT"


class ParityError(KilnError):
    """The exported package does not match its PyTorch original within tolerance."""

    exit_code = 7
    grpc_status = "INTERNAL"

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report


class PackageError(KilnError):
    """A package on disk is missing files, corrupt, or from a newer format."""

    exit_code = 8
    grpc_status = "FAILED_PRECONDITION"


class ProviderUnavailable(KilnError):
    """An execution provider was asked for that this onnxruntime build or machine lacks."""

    exit_code = 9
    grpc_status = "FAILED_PRECONDITION"


class MissingDependency(KilnError, ImportError):
    """An optional extra (e.g. kiln-serve[export]) is needed for this command but not installed."""

    exit_code = 10
    grpc_status = "UNIMPLEMENTED"


class ModelNotServed(KilnError):
    """A request named a model (or version) the server does not serve."""

    grpc_status = "NOT_FOUND"


class QueueFull(KilnError):
    """A model's queue is at its bound; the caller should retry later."""

    grpc_status = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(KilnError):
    """The call's deadline passed before its work ran."""

    grpc_status = "DEADLINE_EXCEEDED"


class RequestTimeout(KilnError):
    """An HTTP client took longer than the server allows to send its request."""

    grpc_status = "DEADLINE_EXCEEDED"
    http_status = 408


class Cancelled(KilnError):
    """The caller cancelled; its queued work was dropped."""

    grpc_status = "CANCELLED"


class Draining(KilnError):
    """The server is shutting down and takes no new work."""

    grpc_status = "UNAVAILABLE"


class RepositoryRefused(KilnError):
    """A load or unload the control mode does not allow, or of a model the repository lacks."""

    grpc_status = "FAILED_PRECONDITION"


class ModelUnavailable(KilnError):
    """A model cannot take work for a moment (its decoding loop is restarting after a failure)."""

    grpc_status = "UNAVAILABLE"


class Unauthenticated(KilnError):
    """A call without the server's bearer token."""

    grpc_status = "UNAUTHENTICATED"


class InternalError(KilnError):
    """An unexpected failure while serving; logged with a request id that the caller gets too."""

    grpc_status = "INTERNAL"


class ConfigError(KilnError):
    """`kiln serve` options that cannot work together (names, TLS files, address)."""

    exit_code = 2
    grpc_status = "INVALID_ARGUMENT"


class ProviderMismatch(UserWarning):
    """A package runs on a provider other than the one its graph was shaped for (still correct,
    not as fast: e.g. a TensorRT package's standard-ops graph on CUDA, or a CUDA package's
    contrib ops, which TensorRT cannot take, left to CUDA)."""
