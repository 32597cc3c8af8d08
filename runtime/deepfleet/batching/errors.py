"""Errors of the batching service, each carrying the HTTP status the KServe v2 front end answers with."""


class BatchingError(Exception):
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInput(BatchingError):
    """The request is wrong; `field` names the offending part (e.g. `inputs[0].shape`)."""

    status = 400

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelNotFound(BatchingError):
    status = 404


class PayloadTooLarge(BatchingError):
    status = 413


class ServiceUnavailable(BatchingError):
    """Queue full (backpressure) or model not ready: the client may retry later."""

    status = 503


class DeadlineExceeded(BatchingError):
    status = 504


class BackendUnavailable(BatchingError):
    """A backend's Python package is missing on this host (e.g. tensorrt on a CPU machine)."""


class ConfigError(BatchingError):
    """A model repository entry is invalid; raised at load time, never while serving."""
