"""Settings of the blocklist member and of its store's refresh, with their defaults.

A leaf (pydantic only, and the engine's settings for the member time budget):
``gateway.config`` composes this section into ``Settings``, and the blocklist and
allowlist stores take their refresh default from here.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from gateway.safety.settings import DEFAULT_MEMBER_TIMEOUT_S

DEFAULT_REFRESH_S = 5.0


class BlocklistSettings(BaseModel):
    enabled: bool = True
    refresh_s: float = Field(default=DEFAULT_REFRESH_S, gt=0)
    timeout_s: float = Field(default=DEFAULT_MEMBER_TIMEOUT_S, gt=0)
