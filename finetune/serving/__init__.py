"""The local model server: one Phi-3 base and its deployed LoRA adapters behind OpenAI's
chat API. ``server`` loads and switches adapters, ``generation`` holds one generation's
types, ``schemas`` the HTTP bodies and ``app`` the FastAPI app."""
