"""Local Hugging Face ``evaluate`` module (loaded by path: works offline)."""
