"""The harness's exceptions. The CLI prints their message; nothing shows a traceback::

    EvalError
     +-- SuiteError           the suite is unusable: names the file and the field at fault
     |    +-- DatasetError    a dataset is missing or malformed (names the line)
     |    +-- ModelNotFound   a model the suite or --model names is unknown
     +-- RunError             unknown run, or a run that cannot be resumed

``SuiteError`` and its children are usage errors (``safegate eval`` exits 2), raised before
any model is called. A model error on one example is not an exception: it is recorded on
that example's ``Output`` and the run goes on.
"""

from __future__ import annotations


class EvalError(Exception):
    """Base class of the harness's errors."""


class SuiteError(EvalError):
    """A suite (or what it points at) cannot be used; the message names file and field."""


class DatasetError(SuiteError):
    """A dataset file is missing or has malformed rows; the message names their lines."""


class ModelNotFound(SuiteError):
    """The suite or ``--model`` names a model that is not known."""


class RunError(EvalError):
    """An unknown run id, or a run that cannot be resumed (different suite, still running)."""
