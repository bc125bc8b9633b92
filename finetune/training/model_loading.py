"""The base model of a training run: checked before a job is queued, loaded as Phi-3 with
its tokenizer, and wrapped with LoRA.

``check_base`` refuses what cannot load before any job exists: a local folder without
``config.json``, the demo base before ``safegate finetune demo`` built it, and (offline)
a hub id missing from the local Hugging Face cache. ``load_base`` loads
``Phi3ForCausalLM`` in the run's precision (bf16 where CUDA supports it, fp32 on CPU;
4-bit for QLoRA, CUDA + bitsandbytes only). ``add_lora`` puts LoRA on Phi-3's fused
projections (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``) and freezes the
rest.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune.errors import BaseModelError
from finetune.registry import ResolvedBase
from finetune.settings import DEMO_BASE
from finetune.training.config import TrainConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def check_base(base: ResolvedBase) -> None:
    """Refuse a base that cannot load, naming the way out (see the module docstring)."""
    if base.registered:
        return
    path = Path(base.location)
    if path.exists():
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"cannot load base model '{base.name}': {path} has no config.json; "
                "pass the folder of a Phi-3 model saved with save_pretrained"
            )
        return
    if base.name == DEMO_BASE:
        raise BaseModelError(
            f"base model '{base.name}' is not registered yet; 'safegate finetune demo' builds it"
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(base.location, "config.json")
        except Exception:  # an id the hub would reject (bad characters, too many slashes)
            cached = None
        if not isinstance(cached, str):
            raise BaseModelError(
                _base_error(base.name, "it is not in the local Hugging Face cache")
            )


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _base_error(base: str, reason: str) -> str:
    if _offline():
        return (
            f"cannot load base model '{base}' offline: {reason}; pass a local path with "
            "--base /path/to/model or set HF_HUB_OFFLINE=0 with network"
        )
    return (
        f"cannot load base model '{base}': {reason}; pass a local path with --base /path/to/model"
    )


def load_base(
    base: ResolvedBase, *, config: TrainConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The Phi-3 model and its tokenizer; ``BaseModelError`` naming the model otherwise."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        model_config = AutoConfig.from_pretrained(base.location)
        tokenizer = AutoTokenizer.from_pretrained(base.location)
    except (OSError, ValueError, KeyError) as error:
        raise BaseModelError(_base_error(base.name, _first_line(error))) from error
    if model_config.model_type != "phi3":
        raise BaseModelError(
            f"base model '{base.name}' is a {model_config.model_type!r} model; "
            "safegate fine-tunes Phi-3 (Phi3ForCausalLM) models"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise BaseModelError(f"base model '{base.name}' has no fast tokenizer (tokenizer.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(config),
        "attn_implementation": config.attn_implementation,
    }
    if config.quantization == "4bit":
        from accelerate import PartialState

        kwargs["quantization_config"] = _bnb_config()
        kwargs["device_map"] = {"": PartialState().local_process_index}  # one GPU per process
    try:
        model = AutoModelForCausalLM.from_pretrained(base.location, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as error:
        raise BaseModelError(_base_error(base.name, _first_line(error))) from error
    return model, tokenizer  # the Trainer moves an unquantized model to its device


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def bf16_supported() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def torch_dtype(config: TrainConfig) -> torch.dtype:
    import torch

    if config.precision == "bf16" or (config.precision == "auto" and bf16_supported()):
        return torch.bfloat16
    if config.precision == "fp16":
        return torch.float16
    return torch.float32


def _bnb_config() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise BaseModelError("4-bit quantization (QLoRA) needs a CUDA GPU; use --quantization none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise BaseModelError(
            "4-bit quantization (QLoRA) needs bitsandbytes: pip install bitsandbytes"
        ) from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16_supported() else torch.float16,
    )


def add_lora(model: PreTrainedModel, *, config: TrainConfig) -> Any:
    """The base wrapped by peft: LoRA on ``config.target_modules``, everything else frozen."""
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    missing = [
        name
        for name in config.target_modules
        if not any(module.endswith(name) for module, _ in model.named_modules())
    ]
    if missing:
        raise BaseModelError(f"the base model has no modules named {', '.join(missing)}")
    if config.quantization == "4bit":
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    elif config.gradient_checkpointing:
        reentrant = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=reentrant)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=reentrant)  # type: ignore[no-untyped-call]
        model.enable_input_require_grads()  # type: ignore[no-untyped-call]
    if model.generation_config is not None:
        model.config.use_cache = False
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        modules_to_save=list(config.modules_to_save) or None,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft reads transformers' deprecated is_gradient_checkpointing (transformers 5.x)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        wrapped = get_peft_model(model, lora)
    import torch

    for parameter in wrapped.parameters():  # trained weights in fp32 (modules_to_save too)
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
    return wrapped
