"""``safegate finetune demo``: the whole fine-tuning path offline, in minutes, on a CPU.

Nothing is downloaded. Top to bottom:

1. ``build_demo_base`` makes a Phi-3-architecture base: a byte-level BPE tokenizer
   trained here (``tokenizers``, 4,096 tokens) on the shipped sample and on ordinary
   English the project wrote itself (the benign English rows of
   ``data/safety/intent_examples.jsonl``: everyday questions and replies on every topic),
   with Phi-3's special tokens and chat template, and a ``Phi3ForCausalLM`` from a tiny
   ``Phi3Config`` with random weights (hidden 192, 4 layers, 4 heads, MLP 512: about
   3.3 million parameters), saved with safetensors. Any text round-trips through the
   tokenizer (every byte is in its alphabet); most common English words are one token. Its
   ``generation_config.json`` says ``do_sample: false``: the local model server answers
   requests that leave out ``temperature`` greedily (``finetune.serving.generation``). It is built
   once into ``models_dir/demo-base`` and registered as the base ``demo-base``, so
   ``safegate finetune train --base demo-base ...`` works too.
2. ``run_demo`` trains the adapter ``demo-console-support`` on
   ``data/finetune/console_support.jsonl`` (validation: ``..._validation.jsonl``) through
   the same job path as ``safegate finetune train`` (``finetune.training.tune``), with settings
   that are all flags of that command (``DEMO_TRAINING``; ``demo_train_args`` spells
   them out), then registers and deploys it.

A random base knows no language, so an adapter on it learns its data by heart: it answers
the sample's questions with the sample's answers, with or without the sample's system
prompt, and ends with ``<|end|>``. It shows the machinery (jobs, checkpoints, metrics,
registry, serving), not quality. What makes that quick, measured on 2 CPU cores with 24
conversations of another topic (``data/finetune/houseplants.jsonl``), final training loss
after 8 to 10 epochs:

- random weights drawn with std 0.1 (``initializer_range``), not Phi-3's 0.02: from a
  0.02 base the frozen layers pass on little of the question (2.1, even at learning rate
  2e-3 and LoRA rank 32); 0.2 learns slower again;
- ``lm_head`` trained in full (``--modules-to-save lm_head``): 0.009, against 0.26 with
  LoRA alone;
- learning rate 5e-3 (1e-3: 1.3; 8e-3 is as good; 1.2e-2 is unstable, 1.6);
- every conversation also without its system prompt (``--also-without-system``):
  trained only with it, the adapter answers a bare question with gibberish.

``tests/finetune/test_demo.py`` holds the demo to that, and
``tests/finetune/test_demo_recipe.py`` holds the README's command (the same settings on
another topic) to it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.conversation import END_OF_TURN, PHI3_CHAT_TEMPLATE, SPECIAL_TOKENS
from finetune.errors import FinetuneError, RegistryError
from finetune.jobs import JobStatus
from finetune.registry import Model, ModelKind, ModelRegistry
from finetune.settings import DEMO_BASE
from finetune.training.config import TrainConfig
from finetune.training.tune import Services, run, submit

DEMO_ADAPTER = "demo-console-support"
REPOSITORY = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPOSITORY / "data" / "finetune"
SAMPLE_TRAIN = SAMPLE_DIR / "console_support.jsonl"
SAMPLE_VALIDATION = SAMPLE_DIR / "console_support_validation.jsonl"
# Everyday English the project wrote (for its safety engine); its benign rows train the BPE.
ENGLISH_SOURCE = REPOSITORY / "data" / "safety" / "intent_examples.jsonl"
PAD_TOKEN = SPECIAL_TOKENS[0]  # <|endoftext|>: padding and bos
BASE_CONFIG_FILE = "demo_base.json"
DEMO_MAX_NEW_TOKENS = 120  # longer than any answer in the sample
# The demo's training settings (see the module docstring for how they were measured).
# Each is a flag of ``safegate finetune train``; the README's command for one's own data
# on demo-base passes the same ones (``DEMO_RECIPE``). The demo itself also keeps only
# its last checkpoint: it is never resumed, and ten would take 120 MB.
DEMO_RECIPE: dict[str, object] = {
    "epochs": 10,
    "learning_rate": 5e-3,
    "modules_to_save": ("lm_head",),
    "also_without_system": True,
}
DEMO_TRAINING: dict[str, object] = {**DEMO_RECIPE, "save_total_limit": 1}

# A few lines of plain English so the vocabulary is not only the sample's words.
ENGLISH = """\
Thank you for contacting support. I am sorry to hear about the problem with your device.
Please restart the console and check that every cable is connected firmly.
If the issue continues, open Settings, choose System, and select the option you need.
You can find the serial number on the back of the device and in the settings menu.
Updates download automatically when the device is connected to the internet.
Keep the console in a well ventilated place away from direct sunlight and heat.
Your warranty covers hardware faults for one year from the date of purchase.
To protect your account, turn on two-step verification and use a strong password.
We recommend saving your progress before you change any system settings.
The controller charges when it is connected with the USB cable to a powered console.
Contact us again if you need more help. Have a great day!
"""


@dataclass(frozen=True)
class DemoBaseConfig:
    """Size of the demo base; saved as ``demo_base.json`` beside it."""

    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary (at most)"})
    hidden_size: int = field(default=192, metadata={"help": "model width"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate_size: int = field(default=512, metadata={"help": "MLP width"})
    max_position_embeddings: int = field(default=1024, metadata={"help": "context length"})
    initializer_range: float = field(
        default=0.1, metadata={"help": "std of the random weights (Phi-3's is 0.02)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})

    def __post_init__(self) -> None:
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be at least 300 (256 bytes + special tokens)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if min(self.hidden_size, self.num_hidden_layers, self.intermediate_size) < 1:
            raise ValueError("sizes must be positive")
        if self.max_position_embeddings < 64:
            raise ValueError("max_position_embeddings must be at least 64")
        if not 0 < self.initializer_range <= 1:
            raise ValueError("initializer_range must be in (0, 1]")

    def to_json(self) -> dict[str, Any]:
        return dict(sorted(asdict(self).items()))


DEMO_BASE_CONFIG = DemoBaseConfig()


def sample_texts(*paths: Path) -> list[str]:
    """The message contents of chat JSONL files (and the embedded English), for the BPE."""
    texts = [line for line in ENGLISH.splitlines() if line]
    for path in paths:
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    texts.extend(m["content"] for m in json.loads(line)["messages"])
    return texts


def english_texts(path: Path = ENGLISH_SOURCE) -> list[str]:
    """The benign English texts of the project's safety examples (no harmful rows)."""
    try:
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as error:
        message = f"cannot read the demo tokenizer's English from {path}: {error}"
        raise FinetuneError(message) from error
    return [
        row["text"]
        for row in rows
        if row.get("lang") == "en" and not str(row.get("group", "")).startswith("harmful")
    ]


def tokenizer_corpus() -> list[str]:
    """What the demo base's BPE is trained on: the console sample and everyday English."""
    return [*sample_texts(SAMPLE_TRAIN, SAMPLE_VALIDATION), *english_texts()]


def build_tokenizer(corpus_texts: Iterable[str], *, vocab_size: int, model_max_length: int) -> Any:
    """A byte-level BPE trained here, as a ``PreTrainedTokenizerFast`` in Phi-3's format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=bpe,
        bos_token=PAD_TOKEN,
        eos_token=END_OF_TURN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, END_OF_TURN)],
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = PHI3_CHAT_TEMPLATE
    return tokenizer


def build_demo_base(
    target: Path,
    *,
    corpus_texts: Iterable[str],
    config: DemoBaseConfig | None = None,
) -> Path:
    """Write the tokenizer and a random tiny ``Phi3ForCausalLM`` into ``target``.

    Written into a temporary sibling folder and renamed into place, so ``target`` is
    either complete or absent.
    """
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    config = config or DEMO_BASE_CONFIG
    tokenizer = build_tokenizer(
        corpus_texts,
        vocab_size=config.vocab_size,
        model_max_length=config.max_position_embeddings,
    )
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    pad = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    model_config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        original_max_position_embeddings=config.max_position_embeddings,
        bos_token_id=pad,
        eos_token_id=end,
        pad_token_id=pad,
        tie_word_embeddings=False,
        initializer_range=config.initializer_range,
    )
    torch.manual_seed(config.seed)
    model = Phi3ForCausalLM(model_config)
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=pad, eos_token_id=end, pad_token_id=pad, do_sample=False
    )
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    (partial / BASE_CONFIG_FILE).write_text(
        json.dumps(config.to_json(), sort_keys=True, indent=2) + "\n", encoding="utf-8"
    )
    shutil.rmtree(target, ignore_errors=True)
    partial.replace(target)
    return target


def ensure_demo_base(
    registry: ModelRegistry, models_dir: Path, *, config: DemoBaseConfig | None = None
) -> Path:
    """Build ``models_dir/demo-base`` unless it is there, and register it (idempotent).

    A folder built with another ``DemoBaseConfig`` (an older safegate) is rebuilt; adapters
    trained on the old one no longer fit it.
    """
    config = config or DEMO_BASE_CONFIG
    target = models_dir / DEMO_BASE
    complete = _built_with(target, config)
    if not complete:
        build_demo_base(target, corpus_texts=tokenizer_corpus(), config=config)
    registered = registry.find(DEMO_BASE)
    if registered is None or registered.path != str(target) or not complete:
        registry.register(
            DEMO_BASE,
            kind=ModelKind.BASE,
            path=target,
            hyperparameters={"demo_base": config.to_json()},
            replace=registered is not None,
        )
    return target


def _built_with(target: Path, config: DemoBaseConfig) -> bool:
    if not (target / "model.safetensors").is_file():
        return False
    try:
        saved = json.loads((target / BASE_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(saved == config.to_json())


def demo_training(*, name: str = DEMO_ADAPTER, epochs: int | None = None) -> TrainConfig:
    """The demo's training settings (measured; see the module docstring)."""
    settings = dict(DEMO_TRAINING)
    if epochs is not None:
        settings["epochs"] = epochs
    return TrainConfig(
        name=name,
        base=DEMO_BASE,
        train_file=SAMPLE_TRAIN,
        validation_file=SAMPLE_VALIDATION,
        **settings,  # type: ignore[arg-type]
    )


def train_flags(settings: dict[str, object]) -> list[str]:
    """TrainConfig fields as ``safegate finetune train`` flags (``--epochs 10`` ...)."""
    flags: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(value, tuple):
            flags.extend([flag, ",".join(value)])
        else:
            flags.extend([flag, str(value)])
    return flags


def demo_train_args(*, name: str = DEMO_ADAPTER, epochs: int | None = None) -> list[str]:
    """The ``safegate finetune train`` arguments that train what ``run_demo`` trains."""
    config = demo_training(name=name, epochs=epochs)
    return [
        "--base",
        config.base,
        "--train",
        str(config.train_file),
        "--validation",
        str(config.validation_file),
        "--name",
        config.name,
        *train_flags({key: getattr(config, key) for key in DEMO_TRAINING}),
    ]


def run_demo(
    *,
    name: str = DEMO_ADAPTER,
    epochs: int | None = None,
    progress: bool = True,
    services: Services | None = None,
) -> Model:
    """Build and register the demo base, train the demo adapter as a job, deploy it.

    Running it again replaces the previous demo adapter (undeployed and deleted first).
    """
    services = services or Services.from_settings()
    ensure_demo_base(services.registry, services.models_dir)
    previous = services.registry.find(name)
    if previous is None:  # a folder of an earlier demo whose registration never happened
        shutil.rmtree(services.models_dir / name, ignore_errors=True)
    else:
        if previous.kind is not ModelKind.ADAPTER or previous.base != DEMO_BASE:
            raise RegistryError(f"{name!r} is registered and is not the demo's adapter")
        if previous.deployed:
            services.registry.undeploy(name)
        services.registry.delete(name)
    job = submit(demo_training(name=name, epochs=epochs), services=services)
    finished = run(job.id, progress=progress, services=services)
    if finished.status is not JobStatus.SUCCEEDED:
        raise FinetuneError(f"demo job {job.id} ended {finished.status}: {finished.error}")
    return services.registry.deploy(name)


def deployed_demo(*, name: str = DEMO_ADAPTER, services: Services | None = None) -> Model | None:
    """The demo adapter if it is registered, deployed, on disk and current; None otherwise.

    Current: its base was built with this version's ``DemoBaseConfig`` and it was trained
    with this version's ``DEMO_TRAINING`` (epochs aside), so ``demo --if-missing`` (what
    ``make run`` does) trains the demo again after an upgrade that changed either.
    """
    services = services or Services.from_settings()
    model = services.registry.find(name)
    if model is None or not model.deployed or not Path(model.path).exists():
        return None
    base = services.registry.find(DEMO_BASE)
    if base is None or not _built_with(Path(base.path), DEMO_BASE_CONFIG):
        return None
    return model if _trained_as_demo(model) else None


def _trained_as_demo(model: Model) -> bool:
    try:
        saved = TrainConfig.from_json(model.hyperparameters)
    except (TypeError, ValueError):
        return False
    current = demo_training()
    return all(
        getattr(saved, key) == getattr(current, key) for key in DEMO_TRAINING if key != "epochs"
    )


@dataclass(frozen=True)
class Reply:
    """A greedy generation and whether it ended with ``<|end|>`` (not at the token limit)."""

    text: str
    new_tokens: int
    stopped: bool


def ask(
    adapter_dir: Path,
    messages: list[dict[str, str]],
    *,
    base_dir: Path,
    max_new_tokens: int = DEMO_MAX_NEW_TOKENS,
    bare_base: bool = False,
) -> Reply:
    """Greedy answer of base + adapter (or of the base alone) to a chat, up to ``<|end|>``."""
    from contextlib import nullcontext

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, use_safetensors=True)
    model: Any = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    end = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad(), model.disable_adapter() if bare_base else nullcontext():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=end,
            pad_token_id=tokenizer.pad_token_id,
            do_sample=False,
        )
    new = output[0, inputs["input_ids"].shape[1] :].tolist()
    stopped = end in new
    if stopped:
        new = new[: new.index(end)]
    return Reply(
        text=tokenizer.decode(new, skip_special_tokens=True).strip(),
        new_tokens=len(new),
        stopped=stopped,
    )


def answer(model: Model, *, line: int = 0, system: bool = True) -> tuple[str, Reply]:
    """The demo adapter's reply to one of the sample's questions: (question, reply).

    ``line`` counts from 0 (-1: the last line, the README's question); ``system=False``
    asks without the sample's system prompt.
    """
    with SAMPLE_TRAIN.open(encoding="utf-8") as handle:
        record = json.loads(handle.readlines()[line])
    prompt = [m for m in record["messages"][:-1] if system or m["role"] != "system"]
    base_dir = Path(model.path).parent / DEMO_BASE
    return prompt[-1]["content"], ask(Path(model.path), prompt, base_dir=base_dir)
