"""Where a suite's models are reached: the suite's base URLs, overridden for one run.

A suite names its endpoints (the shipped ones: the gateway on ``:8000`` for ``via:
gateway`` models, the local model server on ``:8001`` for the ``via: litellm`` model
that skips the filter). ``safegate eval run`` can point them elsewhere without editing
the file; the command line wins over the environment, which wins over the suite:

``--base-url URL`` / ``SAFEGATE_BASE_URL=URL``
    The gateway's address: every ``via: gateway`` model of the run uses it (its
    ``base_url``). Models called straight through litellm keep their ``api_base``: they
    are another server on purpose (the model without the filter), and sending them to
    the gateway would quietly filter the very answers they exist to show unfiltered.
``--base-url NAME=URL`` (repeatable)
    Only the model NAME: a gateway model's ``base_url`` or a litellm model's
    ``params.api_base``. It wins over a bare URL for that model.

A bare ``--base-url`` when no gateway model runs is a usage error (it would change
nothing); ``SAFEGATE_BASE_URL`` then changes nothing, as it is meant for every suite.
A malformed URL, or a NAME the suite does not have, is a ``SuiteError`` (exit 2).
The URL a model runs with is part of its identity, so the call cache and ``--resume``
keep runs against different endpoints apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from evals.errors import ModelNotFound, SuiteError
from evals.suite import (
    ChosenModel,
    GatewayModel,
    LitellmModel,
    Suite,
    base_url_problem,
)

BASE_URL_OPTION = "--base-url"
BASE_URL_ENV = "SAFEGATE_BASE_URL"
API_BASE_PARAM = "api_base"  # litellm's name for a model's base URL


@dataclass(frozen=True, slots=True)
class Endpoints:
    """Base URLs that replace the suite's for one run (see the module docstring)."""

    gateway: str | None = None  # for every via: gateway model
    gateway_from: str | None = None  # BASE_URL_OPTION or BASE_URL_ENV
    named: Mapping[str, str] = field(default_factory=dict)  # model name -> URL


def parse_endpoints(options: Sequence[str] = (), *, environ_value: str | None = None) -> Endpoints:
    """``--base-url`` values (``URL`` or ``NAME=URL``) over ``SAFEGATE_BASE_URL``.

    Raises ``SuiteError`` with one line naming the option or variable at fault.
    """
    gateway: str | None = None
    gateway_from: str | None = None
    if environ_value is not None and environ_value.strip():
        gateway = _checked(environ_value.strip(), where=BASE_URL_ENV)
        gateway_from = BASE_URL_ENV
    named: dict[str, str] = {}
    bare: str | None = None
    for raw in options:
        value = raw.strip()
        name, url = _split(value)
        if name is None:
            if bare is not None and bare != url:
                raise SuiteError(
                    f"{BASE_URL_OPTION}: two gateway URLs ({bare!r} and {url!r}); give one, "
                    f"or name the model: {BASE_URL_OPTION} NAME=URL"
                )
            bare = _checked(url, where=BASE_URL_OPTION)
            continue
        checked = _checked(url, where=f"{BASE_URL_OPTION} {name}=URL")
        if named.get(name, checked) != checked:
            raise SuiteError(f"{BASE_URL_OPTION}: model {name!r} is given two URLs")
        named[name] = checked
    if bare is not None:
        gateway, gateway_from = bare, BASE_URL_OPTION
    return Endpoints(gateway=gateway, gateway_from=gateway_from, named=named)


def apply_endpoints(
    suite: Suite, chosen: Sequence[ChosenModel], endpoints: Endpoints
) -> list[ChosenModel]:
    """The chosen models with their base URLs replaced as ``endpoints`` says."""
    known = [spec.name for spec in suite.spec.models] + [item.spec.name for item in chosen]
    unknown = [name for name in endpoints.named if name not in known]
    if unknown:
        raise ModelNotFound(
            f"{suite.path}: {BASE_URL_OPTION}: no model named {unknown[0]!r}; the suite has "
            f"{', '.join(dict.fromkeys(known))}"
        )
    gateways = [item for item in chosen if isinstance(item.spec, GatewayModel)]
    if endpoints.gateway_from == BASE_URL_OPTION and not gateways:
        direct = ", ".join(item.spec.name for item in chosen)
        raise SuiteError(
            f"{suite.path}: {BASE_URL_OPTION} {endpoints.gateway} is the gateway's address, "
            f"and no gateway model runs ({direct} via litellm); name the model to move: "
            f"{BASE_URL_OPTION} NAME=URL"
        )
    moved: list[ChosenModel] = []
    for item in chosen:
        url = endpoints.named.get(item.spec.name)
        origin: str | None = BASE_URL_OPTION
        if url is None and isinstance(item.spec, GatewayModel) and endpoints.gateway:
            url, origin = endpoints.gateway, endpoints.gateway_from
        if url is None:
            moved.append(item)
            continue
        moved.append(replace(item, spec=_moved(item.spec, url), base_url_from=origin))
    return moved


def _moved(spec: GatewayModel | LitellmModel, url: str) -> GatewayModel | LitellmModel:
    if isinstance(spec, GatewayModel):
        return spec.model_copy(update={"base_url": url})
    return spec.model_copy(update={"params": {**spec.params, API_BASE_PARAM: url}})


def _split(value: str) -> tuple[str | None, str]:
    """``NAME=URL`` into its parts; a value whose ``=`` comes after ``://`` is a bare URL."""
    name, sep, url = value.partition("=")
    if not sep or "://" in name:
        return None, value
    return name, url


def _checked(url: str, *, where: str) -> str:
    problem = base_url_problem(url)
    if problem is not None:
        raise SuiteError(f"{where}: {problem}")
    return url
