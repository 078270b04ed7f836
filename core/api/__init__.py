"""An OpenAI-compatible HTTP API over the swarm (`swarm api`).

- `config.py`: `ApiConfig`, every knob of the API (limits, key, models) in one dataclass;
- `protocol.py`: the OpenAI request bodies checked into typed requests (`ApiError` for anything unsupported or out of
  bounds, never a field silently ignored) and the response and chunk bodies;
- `models.py`: `ModelRegistry`, the models (and adapters) the swarm serves, from discovery records, and one client per
  model, loaded on first use;
- `generation.py`: `Generation`, one request's answer on a worker thread, in an inference session of its own, with
  stop strings, streaming of text as it is decoded, seeded sampling and cancellation;
- `app.py`: the Starlette application (`build_app`) and `serve` (uvicorn on a socket bound first, so port 0 works).
"""

from .config import ApiConfig

__all__ = ["ApiConfig"]
