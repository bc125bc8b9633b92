"""Fine-tuning's exceptions. The CLI prints their message; nothing shows a traceback.

The local model server (``finetune.serving``) answers its own with their HTTP status and
OpenAI-style error fields ``{"error": {"message", "type", "param", "code"}}``::

FinetuneError
 +-- DataError                a training file is malformed (the report names lines)
 +-- BaseModelError           a base model cannot be loaded (offline, or a bad path)
 +-- JobError                 unknown job, or an action its state does not allow
 +-- RegistryError            unknown model, name taken
 |    +-- ModelDeployed       delete refused while the model is deployed
 |    +-- NotABase            a base argument names an adapter
 +-- ServingError             status  type                   code
      +-- InvalidRequest      400     invalid_request_error  invalid_value, ...
      +-- ModelNotFound       404     invalid_request_error  model_not_found
      +-- ModelUnavailable    503     service_unavailable    model_unavailable
      +-- ServerBusy          503     service_unavailable    server_busy
"""

from __future__ import annotations


class FinetuneError(Exception):
    """Base class of fine-tuning errors."""


class DataError(FinetuneError):
    pass


class BaseModelError(FinetuneError):
    pass


class JobError(FinetuneError):
    pass


class RegistryError(FinetuneError):
    pass


class ModelDeployed(RegistryError):
    pass


class NotABase(RegistryError):
    """A base argument names a registered adapter; ``base`` is the adapter's own base."""

    def __init__(self, message: str, *, adapter: str, base: str) -> None:
        super().__init__(message)
        self.adapter = adapter
        self.base = base


class ServingError(FinetuneError):
    """A request the server refuses; carries its HTTP status and OpenAI error fields."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidRequest(ServingError):
    pass


class ModelNotFound(ServingError):
    status = 404
    default_code = "model_not_found"


class ModelUnavailable(ServingError):
    status = 503
    type = "service_unavailable"
    default_code = "model_unavailable"


class ServerBusy(ServingError):
    status = 503
    type = "service_unavailable"
    default_code = "server_busy"


MAX_REASON_CHARS = 300  # of a failure's description (the server's /healthz shows them)


def failure_reason(exc: Exception) -> str:
    """An exception's type and first two lines (peft lists every mismatched tensor)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    more = f" (+{len(lines) - 2} more lines)" if len(lines) > 2 else ""
    return f"{type(exc).__name__}: {' '.join(lines[:2])[:MAX_REASON_CHARS]}{more}"
