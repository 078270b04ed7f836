"""The models the API offers: what the swarm serves (discovery records), and one client per model.

`ModelRegistry.listing()` is `/v1/models`: each model the swarm's serving records announce (or only those of
`ApiConfig.models`, under their public names), and each adapter its servers hold as `MODEL:ADAPTER` with the model as
`parent` (vLLM's way). `resolve(name)` finds a request's model (its id, an alias, or `MODEL:ADAPTER`) and returns
its client, loaded once (`AutoDistributedModelForCausalLM` on the shared discovery) and kept for every later request;
requests each generate through a `shared_view` of it, so they run at once.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from ...transport.discovery import Discovery
from ...transport.errors import ConfigError, SwarmError
from ...transport.records import ServerRecord
from ..aliases import matches
from ..coverage import SERVING_STATES
from ..weights import is_local_copy
from .config import ApiConfig
from .protocol import ApiError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Loaded:
    """A model's client and tokenizer, kept by the API."""

    name: str  # the public name
    model: Any  # DistributedModelForCausalLM
    tokenizer: Any
    context: int  # most tokens a session may hold (the model's max_position_embeddings)


@dataclass(frozen=True)
class Entry:
    """One line of /v1/models."""

    id: str
    parent: str | None = None


class ModelRegistry:
    def __init__(self, discovery: Discovery, config: ApiConfig):
        self.discovery, self.config = discovery, config
        self._loaded: dict[str, Loaded] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # --- what is offered -----------------------------------------------------------------------------------------

    def _serving(self) -> list[ServerRecord]:
        return [r for r in self.discovery.records() if r.state in SERVING_STATES]

    def _offered(self, records: list[ServerRecord]) -> dict[str, str]:
        """Public name -> what to load it from, for every model offered now."""
        if self.config.models:
            return dict(self.config.models)
        offered: dict[str, str] = {}
        for record in records:
            local = is_local_copy(record)
            if record.model not in offered or local:
                offered[record.model] = record.path if local else record.model
        return offered

    def listing(self) -> list[Entry]:
        records = self._serving()
        entries = []
        for name, source in sorted(self._offered(records).items()):
            entries.append(Entry(name))
            adapters = {a for r in records if matches(source, r.model) for a in r.adapters}
            entries += [Entry(f"{name}:{adapter}", name) for adapter in sorted(adapters)]
        return entries

    # --- what a request asks for --------------------------------------------------------------------------------

    def resolve(self, requested: str) -> tuple[Loaded, str | None]:
        """The client of the model `requested` names and the adapter it asks for (None: the bare model); ApiError 404
        when the swarm offers no such model. Blocks while the model's client loads (call it off the event loop)."""
        found = self._find(requested)
        if found is None and not self.listing():  # nothing seen yet: the swarm may still be being discovered
            self.discovery.wait(lambda _: self._find(requested) is not None, self.config.model_wait)
            found = self._find(requested)
        if found is None:
            offered = ", ".join(e.id for e in self.listing()) or "none yet"
            raise ApiError(f"the model {requested!r} is not served by this swarm (offered: {offered})", status=404,
                           param="model", code="model_not_found")
        name, source, adapter = found
        return self._load(name, source), adapter

    def _find(self, requested: str) -> tuple[str, str, str | None] | None:
        records = self._serving()
        offered = self._offered(records)
        for candidate, adapter in _splits(requested):
            for name, source in offered.items():
                if candidate != name and not matches(candidate, name):
                    continue
                if adapter is not None and not any(matches(source, r.model) and adapter in r.adapters
                                                   for r in records):
                    continue
                return name, source, adapter
        return None

    def _load(self, name: str, source: str) -> Loaded:
        with self._lock:
            if name in self._loaded:
                return self._loaded[name]
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one load per model; other models load meanwhile
            if name not in self._loaded:
                self._loaded[name] = self._connect(name, source)
            return self._loaded[name]

    def _connect(self, name: str, source: str) -> Loaded:
        from ..aliases import resolve_alias
        from ..client.model import AutoDistributedModelForCausalLM
        from ..weights import ModelSource

        log.info("loading the client of %s from %s", name, source)
        try:
            model = AutoDistributedModelForCausalLM.from_pretrained(source, config=self.config.client,
                                                                    discovery=self.discovery,
                                                                    device=self.config.device)
        except SwarmError as e:
            raise ApiError(f"cannot reach the model {name!r}: {e}", status=503, type_="server_error",
                           code="swarm_unavailable") from e
        try:
            tokenizer = ModelSource(resolve_alias(source)).tokenizer()
        except ConfigError as e:
            model.close()
            raise ApiError(f"the model {name!r} has no tokenizer here: {e}", status=503, type_="server_error",
                           code="no_tokenizer") from e
        context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        return Loaded(name, model, tokenizer, context)

    def close(self) -> None:
        with self._lock:
            loaded, self._loaded = list(self._loaded.values()), {}
        for entry in loaded:
            entry.model.close()


def _splits(requested: str) -> list[tuple[str, str | None]]:
    """`requested` as a model alone, then as `MODEL:ADAPTER` (a model id may hold a colon: `REPO:FILE.gguf`)."""
    out: list[tuple[str, str | None]] = [(requested, None)]
    if ":" in requested:
        model, adapter = requested.rsplit(":", 1)
        if model and adapter:
            out.append((model, adapter))
    return out
