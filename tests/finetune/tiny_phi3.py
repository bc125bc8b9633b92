"""A tiny Phi-3 the tests build in a temporary folder: the expensive edge, replaced at its seam.

``build_base(folder)`` writes a randomly initialised ``Phi3ForCausalLM`` (hidden 64, two
layers) with a word-level tokenizer made here over a fixed word list, carrying Phi-3's
special tokens and chat template. ``build_adapter(base, folder, seed=...)`` writes a LoRA
adapter for it whose weights are random (``init_lora_weights=False``), so two adapters
with different seeds change the base's output in different ways. ``register(...)`` puts
them in a ``ModelRegistry``. Nothing is downloaded; everything loads with safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from finetune.conversation import END_OF_TURN, PHI3_CHAT_TEMPLATE, SPECIAL_TOKENS
from finetune.db import Database
from finetune.registry import Model, ModelKind, ModelRegistry

UNKNOWN = "[UNK]"
_WORD_LIST = """
hello world the a an is are was be to of and in on at for with not no yes cat dog bird
fish tree house car road sky sun moon star rain snow wind fire water red green blue
black white big small fast slow good bad happy sad safe unsafe i you we they it this
that what why how when where who please thanks sorry help tell me about story poem
answer question request refuse cannot will can do one two three four five six seven
eight nine ten . , ! ?
"""
WORDS = tuple(_WORD_LIST.split())
LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
CONTEXT = 256


def build_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: index for index, word in enumerate([UNKNOWN, *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        unk_token=UNKNOWN,
        eos_token=END_OF_TURN,
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def build_base(
    folder: Path, *, seed: int = 0, chat_template: bool = True, hidden_size: int = 64
) -> Path:
    """Write a tiny Phi-3 base (model and tokenizer) to ``folder`` and return it."""
    tokenizer = build_tokenizer()
    if not chat_template:
        tokenizer.chat_template = None
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=CONTEXT,
        original_max_position_embeddings=CONTEXT,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_adapter(base: Path, folder: Path, *, seed: int, rank: int = 8) -> Path:
    """Write a randomly initialised LoRA adapter for the tiny base to ``folder``."""
    model = Phi3ForCausalLM.from_pretrained(base, use_safetensors=True)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=LORA_TARGETS,
        lora_dropout=0.0,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():  # random LoRA weights are small; make them matter on a tiny model
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def train_adapter(
    base: Path,
    folder: Path,
    *,
    prompts: tuple[str, ...],
    answer: str,
    steps: int = 30,
    seed: int = 0,
) -> Path:
    """Write a LoRA adapter trained until the tiny base answers ``answer`` and ``<|end|>``.

    A few dozen Adam steps on the prompts are enough for a model this small to learn to
    stop, which a randomly initialised adapter almost never does.
    """
    tokenizer = build_tokenizer()
    model = Phi3ForCausalLM.from_pretrained(base, use_safetensors=True)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    rows: list[tuple[list[int], list[int]]] = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        if not isinstance(text, str):
            raise TypeError("the chat template rendered no text")
        context = tokenizer.encode(text, add_special_tokens=False)
        target = tokenizer.encode(answer + END_OF_TURN, add_special_tokens=False)
        rows.append((context + target, [-100] * len(context) + target))
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        for ids, labels in rows:
            loss = peft_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    folder.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def register(
    registry: ModelRegistry,
    *,
    base_name: str,
    base_path: Path,
    adapters: dict[str, Path],
    deploy: bool = True,
) -> list[Model]:
    """Register the base and each adapter (deployed unless told otherwise)."""
    registered = [registry.register(base_name, kind=ModelKind.BASE, path=base_path)]
    for name, path in adapters.items():
        registered.append(
            registry.register(
                name,
                kind=ModelKind.ADAPTER,
                path=path,
                base=base_name,
                hyperparameters={"r": 8, "lora_alpha": 16, "learning_rate": 2e-4},
                data_sha256={"train": "0" * 64},
                metrics={"eval_loss": 1.25},
            )
        )
        if deploy:
            registry.deploy(name)
    return registered


def make_registry(folder: Path) -> ModelRegistry:
    """A registry on a fresh SQLite database in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    database = Database(f"sqlite:///{folder / 'safegate.db'}")
    database.migrate()
    return ModelRegistry(database)
