"""Metrics: the seam (``base``), quality metrics (``quality``, local evaluate modules) and
safety metrics (``safety``, the project's engine and refusal detector)."""
