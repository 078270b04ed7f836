"""A small, self-contained random demo model that needs no downloads (tests, benchmarks, `swarm chat --demo random`).

The default demo, a real chat model, is in `chat_demo.py`; both are built once into the cache by `build_once`.


swarm normally serves models fetched from a model hub, but tests, tutorials and
first-run smoke checks need *some* model that is available offline on any
machine.  This module builds one locally:

* :func:`build_demo_tokenizer` - a byte-level tokenizer made with the
  ``tokenizers`` library (every one of the 256 bytes is a token, token id ==
  byte value, plus ``<s>``/``</s>``/``<pad>`` and chat role markers), wrapped in
  :class:`transformers.PreTrainedTokenizerFast` with a simple Jinja chat
  template.  Any UTF-8 text round-trips through encode/decode.
* :func:`ensure_demo_model` - returns the directory of a tiny Llama model
  (``LlamaForCausalLM``, float32, 8 layers, hidden size 256, grouped-query
  attention with 8 query / 4 key-value heads) with *random* weights drawn from a
  fixed seed, creating it under the cache directory if it is missing.  The
  weights are deterministic (same bytes on the same torch build), so every node
  of a swarm that builds the demo model independently gets the same weights.
  The directory is written to a temporary sibling and renamed into place, so a
  crash or a concurrent builder never leaves a half-written model behind.
  It loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and
  ``AutoTokenizer.from_pretrained(dir)`` offline.
* :func:`is_demo_model` - tells whether a directory is such a demo model (it
  holds the ``swarm_demo.json`` marker file).
* :func:`default_cache_dir` - ``$SWARM_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/swarm``, else ``~/.cache/swarm``.

The weights are random: the demo model produces gibberish.  It exists to
exercise loading, sharding, transport and generation code paths, not to be
useful as a language model.

Importing this module has no side effects; torch and transformers are imported
lazily by the functions that need them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..transport.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "swarm-demo-llama"
# Bump whenever the architecture, tokenizer or weight generation changes: the
# version is part of the cache directory name, so an old cache is not reused.
DEMO_MODEL_VERSION = "1"
DEMO_MODEL_SEED = 20240611
MARKER_FILE = "swarm_demo.json"

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *ROLE_TOKENS)

# Model sizes (kept small: ~6M parameters, ~24 MB in float32).
HIDDEN_SIZE = 256
INTERMEDIATE_SIZE = 688
NUM_HIDDEN_LAYERS = 8
NUM_ATTENTION_HEADS = 8
NUM_KEY_VALUE_HEADS = 4
MAX_POSITION_EMBEDDINGS = 2048
INITIALIZER_RANGE = 0.02

# Each message is "<|role|>\n{content}</s>\n"; the generation prompt opens an
# assistant turn.  Roles other than system/user/assistant are rejected.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unsupported chat role: ' + message['role'] + ' (use system, user or assistant)') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """Return swarm's cache directory.

    ``$SWARM_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/swarm``, else
    ``~/.cache/swarm``.  The directory is not created.
    """
    explicit = os.environ.get("SWARM_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "swarm"
    return Path.home() / ".cache" / "swarm"


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    """Return where :func:`ensure_demo_model` keeps the demo model (it may not exist yet)."""
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"{DEMO_MODEL_NAME}-v{DEMO_MODEL_VERSION}"


def is_demo_model(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding a swarm demo model (its marker file is there)."""
    return (Path(path) / MARKER_FILE).is_file()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, as used by the ByteLevel pre-tokenizer/decoder."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_demo_tokenizer() -> PreTrainedTokenizerFast:
    """Build the demo byte-level tokenizer (no downloads).

    Token ids 0-255 are the raw bytes (id == byte value), followed by the
    special tokens ``<s>``, ``</s>``, ``<pad>``, ``<|system|>``, ``<|user|>``,
    ``<|assistant|>``.  Plain encoding prepends ``<s>`` like Llama tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    for offset, token in enumerate(SPECIAL_TOKENS):
        vocab[token] = 256 + offset

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN])],
    )

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
        padding_side="left",
    )


def _init_weights_deterministically(model: Any, seed: int, std: float) -> None:
    """Overwrite every parameter from a private generator, in name order.

    This makes the weights depend only on ``seed`` and torch's RNG - not on the
    global RNG state, other threads, or how a given transformers release
    initialises Llama - so independently built demo models match.
    """
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)


def _write_demo_model(target: Path) -> None:
    """Write the demo model, tokenizer and marker file into the (empty) directory ``target``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_demo_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_HIDDEN_LAYERS,
        num_attention_heads=NUM_ATTENTION_HEADS,
        num_key_value_heads=NUM_KEY_VALUE_HEADS,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    # Construction draws from the global RNG; fork it so callers' random streams are untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_MODEL_SEED)
        model = LlamaForCausalLM(config).to(torch.float32)
    _init_weights_deterministically(model, DEMO_MODEL_SEED, INITIALIZER_RANGE)
    model.eval()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)

    marker = {
        "name": DEMO_MODEL_NAME,
        "version": DEMO_MODEL_VERSION,
        "seed": DEMO_MODEL_SEED,
        "random_weights": True,
        "note": "Weights are random (fixed seed); this model produces gibberish and is for testing only.",
        "torch_version": torch.__version__,
    }
    # The marker is written last: its presence means the directory is complete.
    (target / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def build_once(target: Path, write: Callable[[Path], None], what: str) -> Path:
    """Return ``target``, a directory that ``write`` fills (marker file last), building it first if it is missing.

    It is built in a temporary sibling directory and renamed into place, so ``target`` is either absent or complete.
    If another process finishes first, its copy is used and ours is discarded.
    """
    if is_demo_model(target):
        logger.debug("Using cached %s at %s", what, target)
        return target
    if target.exists():
        raise ConfigError(f"{target} exists but is not a swarm demo model (no {MARKER_FILE}); remove it "
                          "to rebuild it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    logger.info("Building %s in %s", what, target)
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # Another builder renamed its copy into place first: use theirs.
            if is_demo_model(target):
                logger.debug("%s at %s was created concurrently; using it", what, target)
                return target
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s ready at %s", what, target)
    return target


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the directory of the random demo model, building it first if it is missing.

    ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    return build_once(demo_model_dir(cache_dir), _write_demo_model, "the random demo model")
