"""The Trainer of a fine-tuning run: transformers' ``Trainer`` plus the metrics
Azure's results.csv reports.

``ChatTrainer`` adds token accuracy on the learned tokens (as TRL's SFTTrainer reports
it) and a validation loss on one validation batch at every log; evaluation keeps token
counts, never logits. ``build_trainer`` wires it with the run's ``TrainConfig``: bf16
where CUDA supports it, an adapter-only checkpoint per epoch, padded or padding-free
micro-batches. Importing this module imports transformers and torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PrinterCallback, Trainer, TrainingArguments

from finetune.training.config import TrainConfig
from finetune.training.dataset import ExampleDataset, make_collator
from finetune.training.encoding import IGNORE_INDEX
from finetune.training.model_loading import bf16_supported

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, TrainerCallback


def _token_counts(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example [correct, counted] next-token predictions on the learned tokens."""
    predicted = logits[:, :-1].argmax(dim=-1)
    target = labels[:, 1:]
    counted = target != IGNORE_INDEX
    correct = (predicted == target) & counted
    return torch.stack([correct.sum(dim=1), counted.sum(dim=1)], dim=1).float()


def preprocess_logits_for_metrics(logits: Any, labels: torch.Tensor) -> torch.Tensor:
    """Reduce each evaluation batch to token counts, so evaluation never keeps logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return _token_counts(logits, labels)


def compute_metrics(prediction: Any) -> dict[str, float]:
    counts = prediction.predictions
    counted = float(counts[:, 1].sum())
    return {"mean_token_accuracy": float(counts[:, 0].sum()) / counted if counted else 0.0}


class ChatTrainer(Trainer):
    """The Trainer, plus token accuracy on the learned tokens (as TRL's SFTTrainer
    reports it) and a validation loss on one validation batch at every log, the way
    Azure's results.csv has ``valid_loss`` per step beside the per-epoch full one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._train_counts: torch.Tensor | None = None
        self._valid_batches: Any = None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if model.training and "labels" in inputs:
            with torch.no_grad():
                counts = _token_counts(outputs.logits.detach(), inputs["labels"]).sum(dim=0)
            self._train_counts = (
                counts if self._train_counts is None else self._train_counts + counts
            )
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            if self._train_counts is not None:
                counts = self.accelerator.reduce(self._train_counts, reduction="sum")
                if counts[1] > 0:
                    logs["mean_token_accuracy"] = float(counts[0] / counts[1])
                self._train_counts = None
            if self.eval_dataset is not None and not self._full_evaluation_follows():
                logs.update(self._one_validation_batch())
        super().log(logs, start_time)

    def _full_evaluation_follows(self) -> bool:
        """At an epoch's last step the full validation runs next; it says more."""
        epoch = self.state.epoch
        by_epoch = self.args.eval_strategy == "epoch"
        return self.control.should_evaluate or (
            by_epoch and epoch is not None and epoch > 0 and epoch == round(epoch)
        )

    def _one_validation_batch(self) -> dict[str, float]:
        if self._valid_batches is None:
            self._valid_batches = iter(self.get_eval_dataloader())
        try:
            batch = next(self._valid_batches)
        except StopIteration:
            self._valid_batches = iter(self.get_eval_dataloader())
            batch = next(self._valid_batches)
        model = self.model
        if model is None:
            raise RuntimeError("the trainer has no model")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.compute_loss_context_manager():
                batch = self._prepare_inputs(batch)
                outputs = model(**batch)
                counts = _token_counts(outputs.logits, batch["labels"]).sum(dim=0)
                loss = outputs.loss.detach()
        finally:
            model.train(was_training)
        loss = self.accelerator.reduce(loss, reduction="mean")
        counts = self.accelerator.reduce(counts, reduction="sum")
        metrics = {"valid_loss": float(loss)}
        if counts[1] > 0:
            metrics["valid_mean_token_accuracy"] = float(counts[0] / counts[1])
        return metrics


def build_trainer(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    *,
    config: TrainConfig,
    train_set: ExampleDataset,
    eval_set: ExampleDataset | None,
    output_dir: Path,
    callbacks: Sequence[TrainerCallback] = (),
    max_steps: int = -1,
    save_checkpoints: bool = True,
) -> Any:
    """A Trainer for an already wrapped model (``add_lora``); the benchmark uses it too."""
    micro_batches = math.ceil(len(train_set) / config.batch_size)
    steps = max(1, math.ceil(micro_batches / config.gradient_accumulation)) * config.epochs
    bf16 = config.precision == "bf16" or (config.precision == "auto" and bf16_supported())
    args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=config.epochs,
        max_steps=max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=math.ceil(config.warmup_ratio * (max_steps if max_steps > 0 else steps)),
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        fp16=config.precision == "fp16",
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        eval_strategy="epoch" if eval_set is not None else "no",
        save_strategy="epoch" if save_checkpoints else "no",
        save_total_limit=config.save_total_limit,
        seed=config.seed,
        data_seed=config.seed,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch",
        use_cpu=not torch.cuda.is_available(),
        torch_compile=config.torch_compile,
    )
    trainer = ChatTrainer(
        model=model,
        args=args,
        data_collator=make_collator(
            tokenizer, packing=config.packing, attn_implementation=config.attn_implementation
        ),
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        compute_metrics=compute_metrics if eval_set is not None else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics
        if eval_set is not None
        else None,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)
    return trainer
