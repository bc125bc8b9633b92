"""``/v1/allowlists``: create, list, read, update (enable, disable) and delete allowlists.

Bodies follow the blocklists' conventions (``gateway.routes.blocklists``): an ``object``
field, lists as ``{"object": "list", "data": [...]}``, deletions as ``{"id", "object",
"deleted": true}``, times as Unix seconds. Reading takes a reviewer key, writing an admin
key, checked where the app includes the router, as for blocklists; the key that creates a
list is kept as ``created_by``. Validation
lives in ``gateway.allowlists.AllowlistStore``; its errors leave as OpenAI-style bodies
through ``gateway.errors``. The routes are plain ``def``: the store does blocking
database I/O, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field

from gateway.access import Principal, Role, require
from gateway.allowlists import MAX_TERMS_PER_LIST, Allowlist, AllowlistChange
from gateway.blocklists import MAX_REGEXES_PER_LIST
from gateway.safety.taxonomy import Category, Direction
from gateway.state import Allowlists

router = APIRouter(prefix="/v1/allowlists", tags=["allowlists"])


# The principal the router's check admitted (its role is checked again; the key is not
# looked up and no second rate-limit token is taken), for ``created_by``.
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]

_CATEGORIES = ", ".join(category.value for category in Category)
_DIRECTIONS = ", ".join(direction.value for direction in Direction)


# -- requests ----------------------------------------------------------------------------


class CreateAllowlist(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1 to 64 letters, digits, '_', '.' or '-'")
    terms: list[str] = Field(
        default_factory=list,
        max_length=MAX_TERMS_PER_LIST,
        description="whole words or phrases, matched after normalisation",
    )
    regexes: list[str] = Field(
        default_factory=list,
        max_length=MAX_REGEXES_PER_LIST,
        description="RE2 patterns, case-insensitive, on the normalised text",
    )
    categories: list[str] = Field(description=f"the categories exempted: {_CATEGORIES}")
    directions: list[str] = Field(description=f"where: {_DIRECTIONS}")
    enabled: bool = True


class UpdateAllowlist(BaseModel):
    """The fields to change; the others stay as they are."""

    model_config = ConfigDict(extra="forbid")

    terms: list[str] | None = Field(default=None, max_length=MAX_TERMS_PER_LIST)
    regexes: list[str] | None = Field(default=None, max_length=MAX_REGEXES_PER_LIST)
    categories: list[str] | None = None
    directions: list[str] | None = None
    enabled: bool | None = None


# -- responses ---------------------------------------------------------------------------


class AllowlistObject(BaseModel):
    id: int
    object: Literal["allowlist"] = "allowlist"
    name: str
    terms: list[str]
    regexes: list[str]
    categories: list[str]
    directions: list[str]
    enabled: bool
    created_by: str
    created_at: int
    updated_at: int

    @classmethod
    def of(cls, allowlist: Allowlist) -> AllowlistObject:
        return cls(
            id=allowlist.id,
            name=allowlist.name,
            terms=list(allowlist.terms),
            regexes=list(allowlist.regexes),
            categories=[category.value for category in allowlist.categories],
            directions=[direction.value for direction in allowlist.directions],
            enabled=allowlist.enabled,
            created_by=allowlist.created_by,
            created_at=int(allowlist.created_at.timestamp()),
            updated_at=int(allowlist.updated_at.timestamp()),
        )


class AllowlistList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AllowlistObject]


class AllowlistDeleted(BaseModel):
    id: int
    object: Literal["allowlist"] = "allowlist"
    name: str
    deleted: Literal[True] = True


# -- routes ------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED)
def create_allowlist(body: CreateAllowlist, principal: Admin, store: Allowlists) -> AllowlistObject:
    created = store.create(
        body.name,
        terms=body.terms,
        regexes=body.regexes,
        categories=body.categories,
        directions=body.directions,
        enabled=body.enabled,
        created_by=principal.key_id,
    )
    return AllowlistObject.of(created)


@router.get("")
def list_allowlists(store: Allowlists) -> AllowlistList:
    return AllowlistList(data=[AllowlistObject.of(allowlist) for allowlist in store.list()])


@router.get("/{name}")
def get_allowlist(name: str, store: Allowlists) -> AllowlistObject:
    return AllowlistObject.of(store.get(name))


@router.patch("/{name}")
def update_allowlist(name: str, body: UpdateAllowlist, store: Allowlists) -> AllowlistObject:
    change = AllowlistChange(
        terms=body.terms,
        regexes=body.regexes,
        categories=body.categories,
        directions=body.directions,
        enabled=body.enabled,
    )
    return AllowlistObject.of(store.update(name, change))


@router.delete("/{name}")
def delete_allowlist(name: str, store: Allowlists) -> AllowlistDeleted:
    deleted = store.delete(name)
    return AllowlistDeleted(id=deleted.id, name=deleted.name)
