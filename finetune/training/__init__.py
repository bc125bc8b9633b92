"""Fine-tuning a Phi-3 base into a LoRA adapter; ``tune`` runs one job top to bottom."""
