"""Distributed causal LMs: the client holds embeddings, final norm and LM head; the swarm runs the blocks.

`AutoDistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers=[...])` reads the config, loads only the
client's tensors, asks the peers what they serve, and returns a model that works like a transformers causal LM:
`model(input_ids)` gives logits (and a loss with `labels`), gradients flow back through the remote blocks, and
`generate()` runs with every option of transformers' generation (greedy, sampling, top-p, streamers). Inside
`model.inference_session(max_length=N)` the attention caches stay on the servers across `generate()` calls and each
step sends only the new tokens' hidden states; outside one, `generate()` opens a session for its own duration.

`AutoDistributedModelForSequenceClassification` is the same client with a classification head on the final hidden
state of each sequence's last real token. Both take `tuning_mode="ptune"|"deep_ptune"` and `pre_seq_len` for prompt
tuning (see ptune.py), or `tuning_mode="lora"` with `lora_rank`, `lora_alpha`, `lora_targets` for a LoRA the client
trains (lora.py), or `prompts=DIR` to load a saved tuning result; `trainable_parameters()` are the prompts (or the
LoRA) and the head, everything else is frozen, and the servers never change.

Adapters served by the swarm (`swarm serve --adapters`) are chosen by name, with PEFT's words: `adapter=NAME` at
`from_pretrained` sets `model.active_adapter`, `model.set_adapter(NAME or None)` changes it, `with
model.use_adapter(NAME):` (Petals' word) changes it for a block of code, and `generate(..., adapter=NAME)` for one call.
Only servers that hold the adapter run the model's blocks then.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutput

from ...transport.discovery import Discovery, DiscoveryConfig
from ...transport.errors import AccessDenied, ConfigError, PeerUnreachable
from ...transport.gossip import GossipConfig
from ...transport.mdns import MdnsSettings
from ..adapters import NAME as ADAPTER_NAME
from ..adapters import PEFT_WEIGHTS
from ..aliases import announced_id, matches, resolve_alias
from ..device import resolve_device
from ..models import ModelFamily
from ..weights import ModelSource, assign_weights, resolve_dtype, strip_prefix
from .config import ClientConfig
from .lora import LoraTuning, new_lora, save_lora
from .ptune import PromptTuning, load_prompts, read_tuned, save_tuned
from .sequence import RemoteSequential
from .session import InferenceSession

log = logging.getLogger(__name__)


class _Tunable:
    """What the distributed models share: prompt tuning, the trainable parameters, saving, closing."""

    task = "lm"
    tuning: PromptTuning | LoraTuning | None
    blocks: RemoteSequential
    input_norm: torch.nn.Module  # the family's norm of the input embeddings (identity for most families)
    active_adapter: str | None = None

    def _head(self) -> dict[str, torch.Tensor]:
        return {}

    def _info(self) -> dict[str, Any]:
        return {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters a tuning run trains: the prompts (or the LoRA) and the task head (with tuning, the rest is
        frozen)."""
        params = [] if self.tuning is None else list(self.tuning.parameters())
        return params + list(self._head().values())

    @property
    def _prefix(self) -> int:
        """Soft prompt tokens put in front of the inputs (they take cache room too)."""
        return self.tuning.pre_seq_len if isinstance(self.tuning, PromptTuning) else 0

    def _extend(self, hidden: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The input embeddings as the first block gets them: soft prompts in front (with their mask and deep prompts),
        then the family's input norm over both (as transformers normalises `inputs_embeds`)."""
        if not isinstance(self.tuning, PromptTuning):
            return self.input_norm(hidden), mask, None
        hidden, mask, deep = self.tuning.extend(hidden, mask)
        return self.input_norm(hidden), mask, deep

    def _lora(self, detach: bool = False) -> Any:
        """The client's LoRA as the servers get it (None without one)."""
        if not isinstance(self.tuning, LoraTuning):
            return None
        weights = self.tuning.weights(self.dtype)
        if detach:
            weights = type(weights).from_tensors(weights.scaling, {n: t.detach() for n, t in weights.tensors().items()})
        return weights

    def set_adapter(self, adapter: str | None) -> None:
        """Run the blocks with adapter `adapter` (a name the swarm's servers announce), or with none (PEFT's name)."""
        if adapter is not None and (not isinstance(adapter, str) or not ADAPTER_NAME.fullmatch(adapter)):
            raise ConfigError(f"adapter must be the name of an adapter the swarm serves, got {adapter!r}")
        if getattr(self, "_session", None) is not None and adapter != self.active_adapter:
            raise ConfigError("cannot change the adapter inside an inference session (its servers run the one it "
                              "opened with)")
        self.active_adapter = adapter

    @contextlib.contextmanager
    def use_adapter(self, adapter: str | None) -> Iterator[None]:
        """Run the blocks with `adapter` inside this block of code (Petals' name)."""
        previous = self.active_adapter
        self.set_adapter(adapter)
        try:
            yield
        finally:
            self.active_adapter = previous

    def save_tuned(self, directory: str, **info: Any) -> Any:
        """Save the prompts and head (safetensors + JSON config; ptune also in PEFT's layout), or the LoRA (a PEFT
        LoRA adapter, with the head), to `directory`."""
        if self.tuning is None:
            raise ConfigError("this model has nothing tuned to save: load it with tuning_mode='ptune', 'deep_ptune' "
                              "or 'lora'")
        config = self.config
        info = {"model": getattr(self, "name_or_path", None), "task": self.task,
                "num_attention_heads": getattr(config, "num_attention_heads", None), **self._info(), **info}
        if isinstance(self.tuning, LoraTuning):
            return save_lora(directory, self.tuning, self._head(), info, self.family, config,
                             int(config.hidden_size))
        return save_tuned(directory, self.tuning, self._head(), info, int(config.hidden_size),
                          self.blocks.num_blocks)

    def close(self) -> None:
        """Stop discovery and close connections (also done when the model is garbage-collected)."""
        self.blocks.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DistributedModelForCausalLM(_Tunable, PreTrainedModel, GenerationMixin):
    """A causal LM whose blocks run on the swarm. Build it with `AutoDistributedModelForCausalLM.from_pretrained`."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: Any, family: ModelFamily, blocks: RemoteSequential,
                 modules: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module],
                 tuning: PromptTuning | LoraTuning | None = None, input_norm: torch.nn.Module | None = None):
        super().__init__(config)
        self.family = family
        self.embed_tokens, self.norm, self.lm_head = modules
        self.input_norm = input_norm if input_norm is not None else torch.nn.Identity()
        self.blocks = blocks
        self.tuning = tuning
        self._session: InferenceSession | None = None
        self.generation_config.use_cache = False  # caches live on the servers, not in transformers' Cache objects

    # --- transformers plumbing ---------------------------------------------------------------------------------

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def _init_weights(self, module: torch.nn.Module) -> None:  # weights come from the checkpoint
        pass

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                                      inputs_embeds: torch.Tensor | None = None, **kwargs: Any) -> dict[str, Any]:
        if inputs_embeds is not None and (self._session is None or self._session.position == 0):
            return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # --- sessions ----------------------------------------------------------------------------------------------

    @property
    def active_session(self) -> InferenceSession | None:
        return self._session

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int | None = None) -> Iterator[InferenceSession]:
        """Keep attention caches on the servers for up to `max_length` tokens across forward/generate calls."""
        if self._session is not None:
            raise ConfigError("an inference session is already active on this model")
        session = self.blocks.inference_session(max_length + self._prefix, batch_size, self.active_adapter,
                                                self._lora(detach=True))
        self._session = session
        self._session_ids: torch.Tensor | None = None
        try:
            yield session
        finally:
            self._session = None
            session.close()

    def shared_view(self) -> DistributedModelForCausalLM:
        """This model with an inference session and an adapter of its own, sharing its modules and connections:
        threads that each generate through their own view run at once (the servers batch their steps together).
        A view is not closed itself: closing this model closes the connections they share."""
        view = copy.copy(self)
        view._session = None
        return view

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, adapter: Any = ..., **kwargs: Any) -> Any:
        """transformers' `generate`, through the swarm; `adapter=NAME` (or None) runs this call with that adapter."""
        if adapter is not ...:
            with self.use_adapter(adapter):
                return self.generate(inputs, *args, **kwargs)
        if self._session is not None:
            return super().generate(inputs, *args, **kwargs)
        if kwargs.get("num_beams", self.generation_config.num_beams or 1) > 1:
            raise ConfigError("beam search is not supported through the swarm yet; use greedy or sampling")
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        embeds = kwargs.get("inputs_embeds")
        if ids is None and embeds is None:
            raise ConfigError("generate() needs input_ids or inputs_embeds")
        batch, length = (ids if ids is not None else embeds).shape[:2]
        batch *= kwargs.get("num_return_sequences", 1) or 1
        max_length = self._generation_length(length, kwargs)
        with self.inference_session(max_length=max_length, batch_size=batch):
            return super().generate(inputs, *args, **kwargs)

    def _generation_length(self, prompt_length: int, kwargs: dict[str, Any]) -> int:
        config = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
        if new is not None:
            return prompt_length + int(new)
        total = kwargs.get("max_length", getattr(config, "max_length", None)) or 20
        return max(int(total), prompt_length + 1)

    # --- forward -----------------------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits for the tokens given (in a session: for the tokens the servers did not have yet)."""
        session = self._session
        if session is not None:
            input_ids, attention_mask, inputs_embeds = self._new_part(session, input_ids, attention_mask,
                                                                      inputs_embeds)
        if inputs_embeds is None:
            if input_ids is None:
                raise ConfigError("forward() needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        hidden = inputs_embeds.to(self.dtype)
        prefix = 0
        if session is None or session.position == 0:  # soft prompts go in front of the first tokens
            hidden, attention_mask, deep = self._extend(hidden, attention_mask)
            prefix = self._prefix
        else:
            hidden, deep = self.input_norm(hidden), None
        if session is not None:
            hidden = session.step(hidden, attention_mask, deep)
        else:
            hidden = self.blocks(hidden, attention_mask, deep, self.active_adapter, self._lora())
        logits = self.lm_head(self.norm(hidden[:, prefix:])).float()
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def _new_part(self, session: InferenceSession, input_ids: torch.Tensor | None,
                  attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The part of the inputs the servers do not hold yet. Token ids must extend what the session holds."""
        done = session.position
        if done:
            done -= self._prefix  # the session holds the soft prompts before the tokens
        if inputs_embeds is not None:  # embeddings are always new tokens
            if attention_mask is not None and attention_mask.shape[1] > inputs_embeds.shape[1]:
                attention_mask = attention_mask[:, done:]
            return None, attention_mask, inputs_embeds
        if input_ids is None:
            raise ConfigError("forward() needs input_ids or inputs_embeds")
        known = self._session_ids
        if done and (known is None or input_ids.shape[1] <= done or input_ids.shape[0] != known.shape[0]
                     or not torch.equal(input_ids[:, :done], known[:, :done])):
            raise ConfigError(f"input_ids must start with the {done} tokens this inference session already holds "
                              "(pass the whole conversation so far, plus new tokens)")
        self._session_ids = input_ids.detach().clone()
        mask = None if attention_mask is None else attention_mask[:, done:]
        return input_ids[:, done:], mask, None


class DistributedModelForSequenceClassification(_Tunable, PreTrainedModel):
    """A sequence classifier whose blocks run on the swarm: a linear head (`score`) on the final hidden state of each
    sequence's last real token. Build it with `AutoDistributedModelForSequenceClassification.from_pretrained`."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True
    task = "classification"

    def __init__(self, config: Any, family: ModelFamily, blocks: RemoteSequential,
                 modules: tuple[torch.nn.Module, torch.nn.Module], score: torch.nn.Linear,
                 tuning: PromptTuning | LoraTuning | None = None, input_norm: torch.nn.Module | None = None):
        super().__init__(config)
        self.family = family
        self.embed_tokens, self.norm = modules
        self.input_norm = input_norm if input_norm is not None else torch.nn.Identity()
        self.score = score
        self.blocks = blocks
        self.tuning = tuning

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed_tokens

    def _init_weights(self, module: torch.nn.Module) -> None:
        pass

    def _head(self) -> dict[str, torch.Tensor]:
        return {"weight": self.score.weight}

    def _info(self) -> dict[str, Any]:
        labels = [str(self.config.id2label.get(i, i)) for i in range(self.config.num_labels)]
        return {"num_labels": self.config.num_labels, "labels": labels}

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        """Class logits [batch, num_labels] (and the cross-entropy loss with `labels`)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ConfigError("forward() needs input_ids or inputs_embeds")
            inputs_embeds = self.embed_tokens(input_ids)
        hidden, mask, deep = self._extend(inputs_embeds.to(self.dtype), attention_mask)
        hidden = self.norm(self.blocks(hidden, mask, deep, self.active_adapter, self._lora()))
        if mask is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device)
        else:  # the last real token of each row, whichever side the padding is on
            slots = torch.arange(mask.shape[1], device=mask.device)
            last = (slots * mask.bool()).argmax(-1)
        logits = self.score(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).float()
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels.to(logits.device).long())
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _Loaded:
    """The parts every distributed model is built from."""

    def __init__(self, name_or_path: str, initial_peers: list[str] | None, torch_dtype: Any,
                 config: ClientConfig | None, mdns: bool | None, mdns_interface: str | None,
                 discovery: Discovery | None, gguf_file: str | None = None, device: Any = "cpu"):
        config = config or ClientConfig()
        self.device = resolve_device(device)  # where the embeddings, the head and any trained tensors run
        self.source = source = ModelSource(resolve_alias(name_or_path), gguf_file=gguf_file)
        self.config = model_config = source.config("auto")
        self.family = family = source.family()
        # on the CPU, `auto` is float32 (the client's few modules cost little there); on a GPU, the 16-bit dtype
        # `--dtype auto` takes there
        auto = "float32" if self.device.type == "cpu" else "auto"
        self.dtype = dtype = resolve_dtype(auto if torch_dtype == "auto" else torch_dtype, model_config, self.device)
        model_config.dtype = dtype
        owns = discovery is None
        if discovery is None:
            settings = DiscoveryConfig(mdns=MdnsSettings.from_options(mdns, mdns_interface),
                                       gossip=GossipConfig(period=config.gossip_period), swarm_key=config.swarm_key)
            discovery = Discovery(initial_peers or [], settings).start()
        self.blocks = blocks = RemoteSequential(family.num_blocks(model_config), int(model_config.hidden_size),
                                                discovery, lambda record: matches(name_or_path, record.model,
                                                                                  gguf_file), config,
                                                owns_discovery=owns)
        try:
            if not blocks.wait_ready(config.connect_timeout) and not blocks.servers():
                where = ", ".join(discovery.initial_peers) or "no initial peers"
                mdns_text = "mDNS on" if discovery.config.mdns.enabled else "mDNS off"
                denied = discovery.denied()
                if denied:
                    address, why = next(iter(denied.items()))
                    raise AccessDenied(f"found no server of {announced_id(name_or_path, gguf_file)!r}: {why}",
                                       code="access_denied", peer=address)
                note = blocks.quant_note()
                raise PeerUnreachable(f"found no server of {announced_id(name_or_path, gguf_file)!r} within "
                                      f"{config.connect_timeout:g} s ({where}; {mdns_text}"
                                      f"{'; ' + note if note else ''}); start one with "
                                      "`swarm serve MODEL --blocks START:END` or check --initial-peers")
            blocks.start_pinging()
        except BaseException:
            blocks.close()
            raise

    def client_modules(self, head: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module,
                                                  dict[str, torch.Tensor]]:
        """Embeddings, final norm, LM head (when `head`), and the checkpoint's classification head tensors; the
        family's input norm goes to `self.input_norm`."""
        prefixes = self.family.client_prefixes(self.config)
        wanted = [prefixes.embed, prefixes.norm, prefixes.score] + ([prefixes.lm_head] if head else [])
        wanted += [prefixes.input_norm] if prefixes.input_norm else []
        tensors = self.source.load_tensors(wanted, dtype=self.dtype)
        with torch.device("meta"):
            embed, norm, lm_head = self.family.build_client_modules(self.config)
            self.input_norm = self.family.build_input_norm(self.config)
        assign_weights(embed, strip_prefix(tensors, prefixes.embed), "the input embeddings")
        if prefixes.input_norm:
            assign_weights(self.input_norm, strip_prefix(tensors, prefixes.input_norm), "the input embeddings' norm")
        assign_weights(norm, strip_prefix(tensors, prefixes.norm), "the final norm")
        if head:
            weights = strip_prefix(tensors, prefixes.lm_head)
            if not weights or getattr(self.config, "tie_word_embeddings", False):
                lm_head.weight = embed.weight
            else:
                assign_weights(lm_head, weights, "the LM head")
        return embed, norm, lm_head, strip_prefix(tensors, prefixes.score)

    def tuning(self, embed: torch.nn.Module, tuning_mode: str | None, pre_seq_len: int | None,
               saved: dict[str, Any] | None, lora: dict[str, Any] | None = None, saved_dir: str | None = None
               ) -> PromptTuning | LoraTuning | None:
        lora = {k: v for k, v in (lora or {}).items() if v is not None}
        if tuning_mode == "lora" or (saved is not None and saved.get("tuning_mode") == "lora"):
            return self._lora_tuning(tuning_mode, pre_seq_len, saved, lora, saved_dir)
        if lora:
            raise ConfigError(f"{', '.join(lora)} need tuning_mode='lora'")
        if saved is not None:
            if tuning_mode not in (None, saved["tuning_mode"]) or pre_seq_len not in (None, saved["pre_seq_len"]):
                raise ConfigError(f"the saved prompts are {saved['tuning_mode']} with pre_seq_len "
                                  f"{saved['pre_seq_len']}; leave tuning_mode and pre_seq_len out to use them")
            if saved.get("hidden_size") != self.blocks.hidden_size or saved.get("num_blocks") != self.blocks.num_blocks:
                raise ConfigError(f"the saved prompts are for a model with {saved.get('num_blocks')} blocks of hidden "
                                  f"size {saved.get('hidden_size')}, this one has {self.blocks.num_blocks} of "
                                  f"{self.blocks.hidden_size}")
            tuning_mode, pre_seq_len = saved["tuning_mode"], saved["pre_seq_len"]
        if tuning_mode is None:
            if pre_seq_len is not None:
                raise ConfigError("pre_seq_len needs tuning_mode='ptune' or 'deep_ptune'")
            return None
        return PromptTuning(tuning_mode, 16 if pre_seq_len is None else pre_seq_len, self.blocks.hidden_size,
                            self.blocks.num_blocks, embed.weight, self.dtype)

    def _lora_tuning(self, tuning_mode: str | None, pre_seq_len: int | None, saved: dict[str, Any] | None,
                     options: dict[str, Any], saved_dir: str | None) -> LoraTuning:
        if pre_seq_len is not None:
            raise ConfigError("pre_seq_len is for prompt tuning, not tuning_mode='lora'")
        if saved is None:
            return new_lora(self.family, self.config, self.blocks.num_blocks, options.get("lora_rank"),
                            options.get("lora_alpha"), options.get("lora_targets"), self.dtype)
        if tuning_mode not in (None, "lora") or options:
            raise ConfigError("the saved result is a LoRA; leave tuning_mode and the lora_ options out to use it")
        if saved.get("hidden_size") != self.blocks.hidden_size or saved.get("num_blocks") != self.blocks.num_blocks:
            raise ConfigError(f"the saved LoRA is for a model with {saved.get('num_blocks')} blocks of hidden size "
                              f"{saved.get('hidden_size')}, this one has {self.blocks.num_blocks} of "
                              f"{self.blocks.hidden_size}")
        lora = new_lora(self.family, self.config, self.blocks.num_blocks, saved["lora_rank"],
                        saved.get("lora_alpha"), saved["lora_targets"], self.dtype)
        from pathlib import Path

        lora.load_peft(Path(str(saved_dir)) / PEFT_WEIGHTS, self.family, self.config)
        return lora


def _finish(model: Any, loaded: _Loaded, tuning: PromptTuning | LoraTuning | None, head: torch.nn.Module | None,
            adapter: str | None = None) -> Any:
    """Name the model after its source and put it in eval mode. With prompt tuning, only the prompts and the task head
    train; without, the client's modules keep their gradients."""
    model.name_or_path = loaded.source.name
    blocks = loaded.blocks
    try:
        model.set_adapter(adapter)
        if adapter is not None and not blocks.wait_ready(blocks.config.connect_timeout, adapter):
            blocks.plan(adapter=adapter)  # raises MissingAdapter, naming the blocks no server holds it for
    except BaseException:
        blocks.close()
        raise
    if tuning is not None:
        model.requires_grad_(False)
        tuning.requires_grad_(True)
        if head is not None:
            head.requires_grad_(True)
    return model.to(loaded.device).eval()


def _saved(prompts: str | None, task: str) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    if prompts is None:
        return None, {}
    config, tensors = read_tuned(prompts)
    if config.get("task", "lm") != task:
        kind = "a classifier" if config.get("task") == "classification" else "a language model"
        raise ConfigError(f"the prompts in {prompts} were tuned for {kind} (task {config.get('task')!r}); load them "
                          f"with the matching Auto class")
    return config, tensors


class AutoDistributedModelForCausalLM:
    """Entry point mirroring transformers' Auto classes."""

    @staticmethod
    def from_pretrained(name_or_path: str, initial_peers: list[str] | None = None, torch_dtype: Any = "auto",
                        config: ClientConfig | None = None, mdns: bool | None = None,
                        mdns_interface: str | None = None, discovery: Discovery | None = None,
                        tuning_mode: str | None = None, pre_seq_len: int | None = None, prompts: str | None = None,
                        gguf_file: str | None = None, adapter: str | None = None, lora_rank: int | None = None,
                        lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                        device: Any = "cpu", **kwargs: Any) -> DistributedModelForCausalLM:
        """Load the client's part of `name_or_path` (a hub id, alias, local directory, or GGUF file; or, with
        `gguf_file`, that GGUF file of the directory or hub repository) and find its servers.

        Servers are found through `initial_peers` (gossip) and mDNS on the local network (`mdns`, or $SWARM_MDNS;
        `mdns_interface` or $SWARM_MDNS_INTERFACE binds it to one interface). A prepared `discovery` may be passed
        instead (it is then not stopped by the model). `tuning_mode` ("ptune" or "deep_ptune") and `pre_seq_len` add
        trainable soft prompts, `tuning_mode="lora"` (with `lora_rank`, `lora_alpha`, `lora_targets`) a trainable
        LoRA; `prompts` loads what a tuning run saved (`swarm tune --task lm --output DIR`). `adapter` names an
        adapter the swarm's servers serve: the blocks run with it (see `set_adapter`). `device` (cpu, auto, cuda,
        cuda:N, mps) is where the client's modules run; hidden states cross to the CPU only at the wire.
        """
        if kwargs:
            raise ConfigError(f"unsupported arguments: {', '.join(kwargs)}")
        saved, tensors = _saved(prompts, "lm")
        lora_options = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
        loaded = _Loaded(name_or_path, initial_peers, torch_dtype, config, mdns, mdns_interface, discovery, gguf_file,
                         device)
        try:
            embed, norm, lm_head, _ = loaded.client_modules(head=True)
            tuning = loaded.tuning(embed, tuning_mode, pre_seq_len, saved, lora_options, prompts)
            if saved is not None and isinstance(tuning, PromptTuning):
                load_prompts(tuning, tensors, str(prompts))
            model = DistributedModelForCausalLM(loaded.config, loaded.family, loaded.blocks, (embed, norm, lm_head),
                                                tuning, loaded.input_norm)
        except BaseException:
            loaded.blocks.close()
            raise
        return _finish(model, loaded, tuning, None, adapter)


class AutoDistributedModelForSequenceClassification:
    """Entry point mirroring transformers' Auto classes, for sequence classification."""

    @staticmethod
    def from_pretrained(name_or_path: str, num_labels: int | None = None, initial_peers: list[str] | None = None,
                        torch_dtype: Any = "auto", config: ClientConfig | None = None, mdns: bool | None = None,
                        mdns_interface: str | None = None, discovery: Discovery | None = None,
                        tuning_mode: str | None = None, pre_seq_len: int | None = None, prompts: str | None = None,
                        gguf_file: str | None = None, adapter: str | None = None, lora_rank: int | None = None,
                        lora_alpha: float | None = None, lora_targets: list[str] | None = None,
                        device: Any = "cpu", **kwargs: Any) -> DistributedModelForSequenceClassification:
        """Like `AutoDistributedModelForCausalLM.from_pretrained`, with a `num_labels`-way head instead of the LM head.

        The head comes from the checkpoint when it has one (`score.weight`), from `prompts` (a saved tuning result),
        or is initialised at random (normal, the config's `initializer_range`).
        """
        if kwargs:
            raise ConfigError(f"unsupported arguments: {', '.join(kwargs)}")
        saved, tensors = _saved(prompts, "classification")
        lora_options = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets)
        if saved is not None:
            if num_labels not in (None, saved.get("num_labels")):
                raise ConfigError(f"the saved head has {saved.get('num_labels')} labels, not {num_labels}")
            num_labels = saved.get("num_labels")
        if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 2:
            raise ConfigError(f"num_labels must be an integer of at least 2, got {num_labels!r}")
        loaded = _Loaded(name_or_path, initial_peers, torch_dtype, config, mdns, mdns_interface, discovery, gguf_file,
                         device)
        try:
            embed, norm, _, head = loaded.client_modules(head=False)
            tuning = loaded.tuning(embed, tuning_mode, pre_seq_len, saved, lora_options, prompts)
            score = torch.nn.Linear(loaded.blocks.hidden_size, num_labels, bias=False, dtype=loaded.dtype)
            weight = tensors.get("head.weight") if saved is not None else head.get("weight")
            if weight is not None and weight.shape != score.weight.shape:
                raise ConfigError(f"the classification head has shape {list(weight.shape)}, expected "
                                  f"{list(score.weight.shape)} ({num_labels} labels)")
            with torch.no_grad():
                if weight is not None:
                    score.weight.copy_(weight.to(score.weight.dtype))
                else:
                    score.weight.normal_(0.0, float(getattr(loaded.config, "initializer_range", 0.02)))
            if saved is not None and isinstance(tuning, PromptTuning):
                load_prompts(tuning, tensors, str(prompts))
            loaded.config.num_labels = num_labels
            if saved is not None and saved.get("labels"):
                loaded.config.id2label = dict(enumerate(saved["labels"]))
                loaded.config.label2id = {v: k for k, v in loaded.config.id2label.items()}
            model = DistributedModelForSequenceClassification(loaded.config, loaded.family, loaded.blocks,
                                                              (embed, norm), score, tuning, loaded.input_norm)
        except BaseException:
            loaded.blocks.close()
            raise
        return _finish(model, loaded, tuning, score, adapter)
