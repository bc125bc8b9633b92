"""Perplexity of references under a local causal LM, as a local ``evaluate`` module.

For each sample the reference is scored after its prompt: the prompt (chat messages as
JSON, rendered with the model's chat template; empty for none) gives context and only
the reference's tokens count. Per-sample perplexity is exp(mean token negative
log-likelihood); the aggregate is their mean (``mean_perplexity``, as Hugging Face's
canonical perplexity reports it) and ``corpus_perplexity`` pools every token.

The model is any transformers causal LM directory or hub id (a cached hub id works
offline), optionally with a PEFT (LoRA) adapter directory on top. Weights load with
safetensors only. Loaded by path, so the module itself needs no network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import evaluate
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evals.metrics.module import TextMetric

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 1024


def _local_only(path: str) -> bool:
    return Path(path).exists() or os.environ.get("HF_HUB_OFFLINE") == "1"


class Perplexity(TextMetric, evaluate.Metric):  # type: ignore[misc]
    """Perplexity of each reference given its prompt, under a local causal LM."""

    URLS = ("https://huggingface.co/docs/transformers/perplexity",)
    COLUMNS = {
        "prompts": 'JSON chat messages ([{"role": ..., "content": ...}]) that\n'
        '        precede each reference, or "" for none.',
        "references": "the texts to score.",
    }
    OPTIONS = """
    model_id (str): a causal LM directory or hub id (offline: must be cached).
    adapter (str or None): a PEFT adapter directory applied on top of model_id.
    batch_size (int): samples per forward pass. Default 8.
    max_length (int): tokens per sample; the prompt is cut from the left to fit. Default 1024.
    device (str): torch device. Default "cpu".
    """
    RETURNS = """
    mean_perplexity (float): mean of per-sample perplexities.
    corpus_perplexity (float): exp of the mean negative log-likelihood over all tokens.
    per_sample (list of float): perplexity of each reference.
    tokens (list of int): reference tokens scored per sample.
    """

    def _compute(
        self,
        prompts: list[str],
        references: list[str],
        model_id: str,
        adapter: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_length: int = DEFAULT_MAX_LENGTH,
        device: str = "cpu",
    ) -> dict[str, Any]:
        if batch_size < 1 or max_length < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        tokenizer = AutoTokenizer.from_pretrained(model_id, local_files_only=_local_only(model_id))
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_id, local_files_only=_local_only(model_id), use_safetensors=True
        )
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        model.eval().to(device)
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

        rows = [
            _encode(tokenizer, prompt, reference, max_length=max_length)
            for prompt, reference in zip(prompts, references, strict=True)
        ]
        nll_sums: list[float] = []
        counts: list[int] = []
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            scored = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, (ids, first_scored) in enumerate(batch):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention[row, : len(ids)] = 1
                scored[row, first_scored : len(ids)] = True
            with torch.inference_mode():
                logits = model(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device)
                ).logits.float()
            # token t is predicted from the logits at t - 1
            log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
            targets = input_ids[:, 1:].to(device)
            token_nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            mask = scored[:, 1:].to(device)
            nll_sums.extend((token_nll * mask).sum(dim=1).tolist())
            counts.extend(mask.sum(dim=1).tolist())

        per_sample = [
            math.exp(total / count) if count else float("nan")
            for total, count in zip(nll_sums, counts, strict=True)
        ]
        scored_samples = [value for value in per_sample if not math.isnan(value)]
        total_tokens = sum(counts)
        return {
            "mean_perplexity": (
                sum(scored_samples) / len(scored_samples) if scored_samples else float("nan")
            ),
            "corpus_perplexity": (
                math.exp(sum(nll_sums) / total_tokens) if total_tokens else float("nan")
            ),
            "per_sample": per_sample,
            "tokens": [int(count) for count in counts],
        }


def _encode(
    tokenizer: Any, prompt: str, reference: str, *, max_length: int
) -> tuple[list[int], int]:
    """Token ids of prompt + reference, and the index of the first reference token."""
    if prompt:
        messages = json.loads(prompt)
        if getattr(tokenizer, "chat_template", None):
            rendered = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        else:
            rendered = "\n".join(str(message["content"]) for message in messages) + "\n"
        context: list[int] = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        bos = tokenizer.bos_token_id
        context = [bos] if bos is not None else []
    target: list[int] = tokenizer(reference, add_special_tokens=False)["input_ids"]
    target = target[: max_length - 1]
    context = context[-(max_length - len(target)) :] if context else []
    if not context:  # the first token has nothing to be predicted from
        return target, 1
    return context + target, len(context)
