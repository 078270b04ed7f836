"""Distributed causal LMs: the client holds embeddings, final norm and LM head; the swarm runs the blocks.

`AutoDistributedModelForCausalLM.from_pretrained(name_or_path, initial_peers=[...])` reads the config, loads only the
client's tensors, asks the peers what they serve, and returns a model that works like a transformers causal LM:
`model(input_ids)` gives logits (and a loss with `labels`), gradients flow back through the remote blocks, and
`generate()` runs with every option of transformers' generation (greedy, sampling, top-p, streamers). Inside
`model.inference_session(max_length=N)` the attention caches stay on the servers across `generate()` calls and each
step sends only the new tokens' hidden states; outside one, `generate()` opens a session for its own duration.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ...transport.discovery import Discovery, DiscoveryConfig
from ...transport.errors import ConfigError, PeerUnreachable
from ...transport.gossip import GossipConfig
from ...transport.mdns import MdnsSettings
from ..aliases import announced_id, matches, resolve_alias
from ..models import ModelFamily
from ..weights import ModelSource, assign_weights, resolve_dtype, strip_prefix
from .config import ClientConfig
from .remote import InferenceSession, RemoteSequential

log = logging.getLogger(__name__)


class DistributedModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A causal LM whose blocks run on the swarm. Build it with `AutoDistributedModelForCausalLM.from_pretrained`."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: Any, family: ModelFamily, blocks: RemoteSequential,
                 modules: tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]):
        super().__init__(config)
        self.family = family
        self.embed_tokens, self.norm, self.lm_head = modules
        self.blocks = blocks
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
        session = self.blocks.inference_session(max_length, batch_size)
        self._session = session
        self._session_ids: torch.Tensor | None = None
        try:
            yield session
        finally:
            self._session = None
            session.close()

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
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

    def close(self) -> None:
        """Stop discovery and close connections (also done when the model is garbage-collected)."""
        self.blocks.close()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        if session is not None:
            hidden = session.step(hidden, attention_mask)
        else:
            hidden = self.blocks(hidden, attention_mask)
        logits = self.lm_head(self.norm(hidden)).float()
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


class AutoDistributedModelForCausalLM:
    """Entry point mirroring transformers' Auto classes."""

    @staticmethod
    def from_pretrained(name_or_path: str, initial_peers: list[str] | None = None, torch_dtype: Any = "auto",
                        config: ClientConfig | None = None, mdns: bool | None = None,
                        mdns_interface: str | None = None, discovery: Discovery | None = None,
                        **kwargs: Any) -> DistributedModelForCausalLM:
        """Load the client's part of `name_or_path` (a hub id, alias, or local directory) and find its servers.

        Servers are found through `initial_peers` (gossip) and mDNS on the local network (`mdns`, or $SWARM_MDNS;
        `mdns_interface` or $SWARM_MDNS_INTERFACE binds it to one interface). A prepared `discovery` may be passed
        instead (it is then not stopped by the model).
        """
        if kwargs:
            raise ConfigError(f"unsupported arguments: {', '.join(kwargs)}")
        config = config or ClientConfig()
        source = ModelSource(resolve_alias(name_or_path))
        model_config = source.config("auto")
        family = source.family()
        dtype = resolve_dtype("float32" if torch_dtype == "auto" else torch_dtype, model_config)
        model_config.dtype = dtype
        owns = discovery is None
        if discovery is None:
            settings = DiscoveryConfig(mdns=MdnsSettings.from_options(mdns, mdns_interface),
                                       gossip=GossipConfig(period=config.gossip_period))
            discovery = Discovery(initial_peers or [], settings).start()
        blocks = RemoteSequential(family.num_blocks(model_config), int(model_config.hidden_size), discovery,
                                  lambda record: matches(name_or_path, record.model), config, owns_discovery=owns)
        try:
            if not blocks.wait_ready(config.connect_timeout) and not blocks.servers():
                where = ", ".join(discovery.initial_peers) or "no initial peers"
                mdns_text = "mDNS on" if discovery.config.mdns.enabled else "mDNS off"
                raise PeerUnreachable(f"found no server of {announced_id(name_or_path)!r} within "
                                      f"{config.connect_timeout:g} s ({where}; {mdns_text}); start one with "
                                      "`swarm serve MODEL --blocks START:END` or check --initial-peers")
            blocks.start_pinging()
        except BaseException:
            blocks.close()
            raise
        prefixes = family.client_prefixes(model_config)
        tensors = source.load_tensors([prefixes.embed, prefixes.norm, prefixes.lm_head], dtype=dtype)
        with torch.device("meta"):
            embed, norm, lm_head = family.build_client_modules(model_config)
        assign_weights(embed, strip_prefix(tensors, prefixes.embed), "the input embeddings")
        assign_weights(norm, strip_prefix(tensors, prefixes.norm), "the final norm")
        head = strip_prefix(tensors, prefixes.lm_head)
        if not head or getattr(model_config, "tie_word_embeddings", False):
            lm_head.weight = embed.weight
        else:
            assign_weights(lm_head, head, "the LM head")
        model = DistributedModelForCausalLM(model_config, family, blocks, (embed, norm, lm_head))
        model.name_or_path = source.name
        return model.eval()
