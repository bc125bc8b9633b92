"""Command modules of ``safegate finetune`` and ``safegate models``."""
