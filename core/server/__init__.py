"""The server runtime: block span, attention cache, compute worker, protocol handler, lifecycle."""

from .server import Server, ServerConfig, parse_blocks

__all__ = ["Server", "ServerConfig", "parse_blocks"]
