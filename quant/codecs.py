"""The names of the wire codecs (quant/compression.py) and which one a peer gets; free of torch, so that the command
line and the client's config read them without it."""

from __future__ import annotations

from collections.abc import Iterable

CODECS: tuple[str, ...] = ("none", "float16", "bfloat16", "int8")
SETTINGS: tuple[str, ...] = (*CODECS, "auto")  # what a client may ask for (`--compression`)
HALF = ("float16", "bfloat16")  # the codecs that are a float dtype of the same name


def choose(setting: str, peer_dtype: str, accepted: Iterable[str]) -> str:
    """The codec to send a peer that computes in `peer_dtype` and decodes `accepted`, for the client's `setting`:
    the codec asked for when the peer accepts it, else `none`. `auto` is the peer's own dtype when that is a 16-bit
    float it accepts: the peer rounds what it receives to its dtype anyway, and its outputs are in that dtype, so
    this halves the bytes of float32 on the wire and changes no value; float32 peers (and older ones) get `none`."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown compression {setting!r}; choose from {', '.join(SETTINGS)}")
    codec = (peer_dtype if peer_dtype in HALF else "none") if setting == "auto" else setting
    return codec if codec in tuple(accepted) else "none"
