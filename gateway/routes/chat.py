"""``POST /v1/chat/completions`` (and Azure's deployment route), ``GET /v1/models``.

The routes parse, call ``gateway.chat.service.ChatService`` and render what it returns: a
blocked prompt's error body, a ``ChatCompletion``, or a stream of server-sent events.
Azure's route ``/openai/deployments/{deployment}/chat/completions?api-version=...`` takes
the deployment as the model and Azure's ``api-key`` header.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, field_validator

from gateway.access import Principal, Role, require
from gateway.chat.schemas import ChatCompletion, ChatCompletionRequest
from gateway.chat.service import ChatService, PromptBlocked
from gateway.errors import InvalidRequest
from gateway.routes.origin import Origin
from gateway.state import AppState, app_state

router = APIRouter(tags=["chat"])

Developer = Annotated[Principal, Depends(require(Role.DEVELOPER))]
State = Annotated[AppState, Depends(app_state)]
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ModelObject(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelObject]


class AzureChatCompletionRequest(ChatCompletionRequest):
    """Azure's body: the deployment in the path names the model, so ``model`` may be
    missing or null (LangChain's ``AzureChatOpenAI`` sends ``"model": null``)."""

    model: str = Field(default="", max_length=128)

    @field_validator("model", mode="before")
    @classmethod
    def _null_model(cls, value: object) -> object:
        return "" if value is None else value


@router.get("/v1/models")
async def list_models(principal: Developer, state: State) -> ModelList:
    state.upstreams.refresh()
    return ModelList(
        data=[
            ModelObject(id=m.id, created=m.created, owned_by=m.owned_by)
            for m in state.upstreams.models()
        ]
    )


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    principal: Developer,
    state: State,
    origin: Origin,
) -> Response:
    return await _render(body, request=request, principal=principal, state=state, origin=origin)


@router.post(
    "/openai/deployments/{deployment}/chat/completions",
    response_model=ChatCompletion,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def azure_chat_completions(
    deployment: str,
    body: AzureChatCompletionRequest,
    request: Request,
    principal: Developer,
    state: State,
    origin: Origin,
    api_version: Annotated[str | None, Query(alias="api-version")] = None,
) -> Response:
    if api_version is None:
        raise InvalidRequest(
            "api-version query parameter is required (e.g. ?api-version=2024-10-21)",
            param="api-version",
            code="missing_api_version",
        )
    body.model = deployment
    return await _render(body, request=request, principal=principal, state=state, origin=origin)


async def _render(
    body: ChatCompletionRequest,
    *,
    request: Request,
    principal: Principal,
    state: AppState,
    origin: str | None,
) -> Response:
    outcome = await ChatService(state).start(
        body, principal=principal, request_id=request.state.request_id, origin=origin
    )
    if isinstance(outcome, PromptBlocked):
        return JSONResponse(outcome.body, status_code=outcome.status)
    if isinstance(outcome, ChatCompletion):
        return JSONResponse(outcome.render())
    return StreamingResponse(outcome.events, media_type="text/event-stream", headers=STREAM_HEADERS)
