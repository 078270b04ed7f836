"""The training loop of `swarm tune`: the client trains its prompts (and head) while the swarm runs the blocks.

`Trainer(model, tokenizer, data, config).run()` tokenizes once, then for each epoch shuffles, batches, and runs forward
+ backward through the swarm (failed servers are retried on others by the client), steps AdamW over
`model.trainable_parameters()` (prompts, or a LoRA, and a classifier's head), evaluates on the validation split (every
`eval_every` steps and at the end), and reports every step and evaluation as an event dict to `on_event` (the CLI draws
a progress bar or prints JSON lines). Setting `stop` ends the run after the current step; the caller then saves.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ...transport.errors import ConfigError
from .data import TASKS, Batch, Example, TuneData, batches, count_batches, pad_token_id, prepare

log = logging.getLogger(__name__)

MODES = ("ptune", "deep_ptune", "lora")
DEFAULT_LR = {"ptune": 1e-2, "deep_ptune": 1e-2, "lora": 1e-3}


@dataclass(frozen=True)
class TuneConfig:
    task: str = "classification"  # or "lm"
    mode: str = "ptune"  # or "deep_ptune", or "lora"
    prompt_length: int = 16
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (whatever the epochs say)
    batch_size: int = 8
    lr: float = 1e-2
    weight_decay: float = 0.0
    seed: int = 0
    max_length: int = 256  # tokens per example (longer ones are truncated, or cut into chunks for lm)
    eval_every: int | None = None  # steps between evaluations (None: at the end only)
    max_eval_examples: int | None = 2000  # evaluate on at most this many validation examples

    def check(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("prompt_length", "epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("max_steps", "eval_every", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0 or not math.isfinite(self.lr) or self.weight_decay < 0:
            raise ConfigError("--lr must be a positive number and --weight-decay at least 0")


Event = dict[str, Any]


class Trainer:
    def __init__(self, model: Any, tokenizer: Any, data: TuneData, config: TuneConfig,
                 on_event: Callable[[Event], None] | None = None, stop: threading.Event | None = None):
        config.check()
        if not data.train:
            raise ConfigError("the dataset has no training examples")
        self.model, self.tokenizer, self.data, self.config = model, tokenizer, data, config
        self.on_event = on_event or (lambda event: None)
        self.stop = stop or threading.Event()
        self.pad_id = pad_token_id(tokenizer)
        self.train_items = prepare(data.train, tokenizer, config.max_length, config.task)
        validation = data.validation
        if config.max_eval_examples is not None and len(validation) > config.max_eval_examples:
            validation = random.Random(config.seed).sample(validation, config.max_eval_examples)
        self.val_items = prepare(validation, tokenizer, config.max_length, config.task) if validation else []
        if not self.train_items:
            raise ConfigError("no training example has any tokens")
        self.optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        # --max-steps, when given, wins over --epochs (as in transformers' Trainer)
        self.total_steps = config.max_steps or count_batches(len(self.train_items), config.batch_size) * config.epochs
        self.step = 0
        self.history: list[Event] = []

    def _emit(self, event: Event) -> None:
        self.history.append(event)
        self.on_event(event)

    def run(self) -> Event:
        """Train; returns the final event (with the last evaluation's metrics)."""
        config = self.config
        torch.manual_seed(config.seed)
        self._emit({"event": "start", "steps": self.total_steps, "train_examples": len(self.train_items),
                    "validation_examples": len(self.val_items), **asdict(config)})
        started, evaluation = time.perf_counter(), {}
        epoch = 0
        while self.step < self.total_steps and not self.stop.is_set():
            for batch in batches(self.train_items, config.batch_size, pad_id=self.pad_id, task=config.task,
                                 shuffle=True, seed=config.seed, epoch=epoch):
                self._train_step(batch, epoch)
                if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                    evaluation = self.evaluate()
                if self.step >= self.total_steps or self.stop.is_set():
                    break
            epoch += 1
        evaluation = self.evaluate() if self.val_items else {}
        final = {"event": "done", "step": self.step, "epochs": epoch, "stopped": self.stop.is_set(),
                 "seconds": round(time.perf_counter() - started, 3), **evaluation}
        self._emit(final)
        return final

    def _train_step(self, batch: Batch, epoch: int) -> None:
        started = time.perf_counter()
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        batch = batch.to(self.model.device)  # the client's device (its embeddings, head and trained tensors)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
        loss = out.loss
        if not torch.isfinite(loss):
            raise ConfigError(f"the loss became {loss.item()} at step {self.step + 1}; try a smaller --lr")
        loss.backward()
        self.optimizer.step()
        self.model.eval()
        self.step += 1
        elapsed = time.perf_counter() - started
        event: Event = {"event": "step", "step": self.step, "epoch": epoch, "loss": round(loss.item(), 6),
                        "tokens_per_s": round(int(batch.attention_mask.sum()) / elapsed, 1)}
        if self.config.task == "classification":
            event["accuracy"] = round((out.logits.argmax(-1) == batch.labels).float().mean().item(), 4)
        self._emit(event)

    @torch.no_grad()
    def evaluate(self) -> Event:
        """Loss (and accuracy, or perplexity for lm) on the validation examples."""
        if not self.val_items:
            return {}
        config = self.config
        loss_sum, weight, correct = 0.0, 0, 0
        for batch in batches(self.val_items, config.batch_size, pad_id=self.pad_id, task=config.task):
            batch = batch.to(self.model.device)
            out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
            if config.task == "classification":
                n = batch.labels.shape[0]
                correct += int((out.logits.argmax(-1) == batch.labels).sum())
            else:
                n = int((batch.labels[:, 1:] != -100).sum())  # predicted tokens: the loss is their mean
            loss_sum += out.loss.item() * n
            weight += n
        if weight == 0:
            return {}
        event: Event = {"event": "eval", "step": self.step, "val_loss": round(loss_sum / weight, 6)}
        if config.task == "classification":
            event["val_accuracy"] = round(correct / weight, 4)
        else:
            event["val_perplexity"] = round(math.exp(min(loss_sum / weight, 50.0)), 4)
        self._emit(event)
        return {k: v for k, v in event.items() if k.startswith("val_")}


@torch.no_grad()
def predict(model: Any, tokenizer: Any, texts: list[str], max_length: int = 256, batch_size: int = 8) -> list[int]:
    """Class ids a classifier gives `texts`."""
    items = prepare([Example(t, 0) for t in texts], tokenizer, max_length, "classification")
    out: list[int] = []
    for batch in batches(items, batch_size, pad_id=pad_token_id(tokenizer), task="classification"):
        batch = batch.to(model.device)
        out.extend(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.argmax(-1).tolist())
    return out
