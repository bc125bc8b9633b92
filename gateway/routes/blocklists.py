"""``/v1/blocklists``: create, list, read and delete custom blocklists, add and remove items.

Bodies follow OpenAI's object conventions (an ``object`` field, lists as
``{"object": "list", "data": [...]}``, deletions as ``{"id", "object", "deleted": true}``,
times as Unix seconds). Validation lives in ``gateway.blocklists.BlocklistStore``; its
errors leave as OpenAI-style bodies through ``gateway.errors``. The routes are plain
``def``: the store does blocking database I/O, so FastAPI runs them in its thread pool.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from gateway.blocklists import (
    MAX_ITEMS_PER_REQUEST,
    Blocklist,
    BlocklistDetail,
    BlocklistItem,
    ItemKind,
    NewItem,
)
from gateway.state import Blocklists

router = APIRouter(prefix="/v1/blocklists", tags=["blocklists"])


# -- requests ----------------------------------------------------------------------------


class CreateBlocklist(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="1 to 64 letters, digits, '_', '.' or '-'")
    description: str = ""


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: ItemKind
    value: str


class AddItems(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ItemIn] = Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)


# -- responses ---------------------------------------------------------------------------


class BlocklistItemObject(BaseModel):
    id: int
    object: Literal["blocklist.item"] = "blocklist.item"
    type: ItemKind
    value: str
    created_at: int

    @classmethod
    def of(cls, item: BlocklistItem) -> BlocklistItemObject:
        return cls(
            id=item.id, type=item.kind, value=item.value, created_at=_seconds(item.created_at)
        )


class BlocklistObject(BaseModel):
    id: int
    object: Literal["blocklist"] = "blocklist"
    name: str
    description: str
    created_at: int
    item_count: int

    @classmethod
    def of(cls, blocklist: Blocklist) -> BlocklistObject:
        return cls(
            id=blocklist.id,
            name=blocklist.name,
            description=blocklist.description,
            created_at=_seconds(blocklist.created_at),
            item_count=blocklist.item_count,
        )


class BlocklistWithItems(BlocklistObject):
    items: list[BlocklistItemObject]

    @classmethod
    def of_detail(cls, blocklist: BlocklistDetail) -> BlocklistWithItems:
        return cls(
            id=blocklist.id,
            name=blocklist.name,
            description=blocklist.description,
            created_at=_seconds(blocklist.created_at),
            item_count=blocklist.item_count,
            items=[BlocklistItemObject.of(item) for item in blocklist.items],
        )


class BlocklistList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BlocklistObject]


class BlocklistItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BlocklistItemObject]


class BlocklistDeleted(BaseModel):
    id: int
    object: Literal["blocklist"] = "blocklist"
    name: str
    deleted: Literal[True] = True


class BlocklistItemDeleted(BaseModel):
    id: int
    object: Literal["blocklist.item"] = "blocklist.item"
    deleted: Literal[True] = True


def _seconds(moment: datetime) -> int:
    return int(moment.timestamp())


# -- routes ------------------------------------------------------------------------------


@router.post("", status_code=status.HTTP_201_CREATED)
def create_blocklist(body: CreateBlocklist, store: Blocklists) -> BlocklistObject:
    return BlocklistObject.of(store.create(body.name, body.description))


@router.get("")
def list_blocklists(store: Blocklists) -> BlocklistList:
    return BlocklistList(data=[BlocklistObject.of(blocklist) for blocklist in store.list()])


@router.get("/{name}")
def get_blocklist(name: str, store: Blocklists) -> BlocklistWithItems:
    return BlocklistWithItems.of_detail(store.get(name))


@router.delete("/{name}")
def delete_blocklist(name: str, store: Blocklists) -> BlocklistDeleted:
    deleted = store.delete(name)
    return BlocklistDeleted(id=deleted.id, name=deleted.name)


@router.post("/{name}/items", status_code=status.HTTP_201_CREATED)
def add_blocklist_items(name: str, body: AddItems, store: Blocklists) -> BlocklistItemList:
    added = store.add_items(
        name, [NewItem(kind=item.type, value=item.value) for item in body.items]
    )
    return BlocklistItemList(data=[BlocklistItemObject.of(item) for item in added])


@router.delete("/{name}/items/{item_id}")
def remove_blocklist_item(name: str, item_id: int, store: Blocklists) -> BlocklistItemDeleted:
    store.remove_item(name, item_id)
    return BlocklistItemDeleted(id=item_id)
