"""safegate's engine inside other gateways.

- ``litellm_guardrail``: ``SafegateGuardrail``, a LiteLLM proxy guardrail (it imports
  litellm: a proxy's ``config.yaml`` names it by its module path).
- ``litellm_texts``: which texts of a LiteLLM request and answer it checks.
- ``litellm_stream``: a streamed answer, released as its checks pass.
- ``litellm_errors``: the refusals it raises, as LiteLLM's guardrails raise them.
"""
