"""Prompt tuning through the swarm: the client trains soft prompts (and a head) while servers keep their weights.

`data` reads and batches the examples: :func:`load_data` turns a local file, a saved dataset directory or a hub
dataset into train and validation examples; :func:`prepare` tokenizes them once and :func:`batches` pads them into
tensors for each epoch. `train` runs the training loop (:class:`Trainer`, :class:`TuneConfig`) and :func:`predict`
classifies texts with a tuned model.
"""

from .data import (
    DATASET_ALIASES,
    Batch,
    DatasetAlias,
    Example,
    Item,
    TuneData,
    batches,
    collate,
    count_batches,
    lm_chunks,
    load_data,
    pad_token_id,
    prepare,
)
from .train import Trainer, TuneConfig, predict

__all__ = [
    "DATASET_ALIASES",
    "Batch",
    "DatasetAlias",
    "Example",
    "Item",
    "TuneData",
    "batches",
    "collate",
    "count_batches",
    "lm_chunks",
    "load_data",
    "pad_token_id",
    "prepare",
    "Trainer",
    "TuneConfig",
    "predict",
]
