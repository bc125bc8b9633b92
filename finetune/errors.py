"""Fine-tuning's exceptions. The CLI prints their message; nothing shows a traceback::

FinetuneError
 +-- DataError            a training file is malformed (the report names lines)
 +-- BaseModelError       a base model cannot be loaded (offline, or a bad path)
 +-- JobError             unknown job, or an action its state does not allow
 +-- RegistryError        unknown model, name taken
 |    +-- ModelDeployed   delete refused while the model is deployed
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
