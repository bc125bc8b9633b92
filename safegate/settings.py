"""Settings every package reads: where state lives, and where the local model server is.

``safegate serve`` starts the local model server (``safegate finetune serve``) on
127.0.0.1 at ``SAFEGATE_LOCAL_MODELS_PORT`` and routes deployed adapters there; ``safegate
finetune serve`` listens there by default. One setting, so the two cannot disagree.
"""

from __future__ import annotations

from pydantic import Field

from safegate.database import StorageSettings

LOCAL_MODELS_HOST = "127.0.0.1"
DEFAULT_LOCAL_MODELS_PORT = 8001


def local_models_api_base(port: int = DEFAULT_LOCAL_MODELS_PORT) -> str:
    """The local model server's OpenAI base URL, as litellm wants it."""
    return f"http://{LOCAL_MODELS_HOST}:{port}/v1"


class SharedSettings(StorageSettings):
    local_models_port: int = Field(
        default=DEFAULT_LOCAL_MODELS_PORT,
        ge=1,
        le=65535,
        description="port of the local model server on 127.0.0.1 (safegate finetune serve)",
    )

    @property
    def local_models_api_base(self) -> str:
        return local_models_api_base(self.local_models_port)
