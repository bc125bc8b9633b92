"""Offline training of the safety engine's own model (``safegate safety train``).

Nothing here runs in the gateway: the runtime loads only what these modules write.
``train`` trains, calibrates and tunes the encoder heads and writes them with their model
card, from the labelled examples ``corpus`` reads, with the fitting and measuring of
``heads_fit`` and the embeddings of ``embedding_cache`` (both shared with
``multilingual``, the heads for other languages); ``own_set`` consolidates the project's
hand-written examples and their held-out split; ``encoder_tuning`` fine-tunes the
sentence encoder end to end with LoRA and ``top_layers`` its upper blocks in full, both
through the step loop, checkpoints and loss of ``loop``.
"""
