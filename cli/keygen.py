"""`swarm keygen`: the keys of a private swarm.

`swarm keygen --out swarm.key` makes a swarm key: every server of the private swarm holds it, and so may every
member (one shared secret). `swarm keygen --member-of swarm.key --out alice.key` makes a member key instead: its
holder connects to the swarm (never serves in it), and the owner admits or revokes it by putting its `.pub` half into
or out of the servers' `--allowed-keys` directory. Each command writes the key (owner-only; a member key's public
half too, `FILE.pub`), never over an existing file, and prints the key's public key on stdout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import LogLevelOption, err_console, setup_logging


def keygen(
    out: Annotated[Path, typer.Option("--out", help="Write the new key here (owner-only; a member key's public half "
                                      "goes to FILE.pub). Never overwrites a file.")],
    member_of: Annotated[str | None, typer.Option(
        help="Make a member key of the swarm whose key is in this file, instead of a new swarm key.")] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Make the key of a private swarm (or a member key of one)."""
    setup_logging(log_level, default="WARNING")
    from ..transport.keys import SwarmKey

    if member_of is None:
        key = SwarmKey.generate()
    else:
        swarm = SwarmKey.load(member_of)
        if not swarm.can_serve:
            from ..transport.errors import ConfigError

            raise ConfigError(f"{member_of} is a member key: member keys are made from the swarm key itself")
        key = swarm.member()
    pub = key.write(out)
    print(key.public.decode(), flush=True)
    if member_of is None:
        err_console.print(f"wrote the swarm key to {out}: give it to the servers (`swarm serve ... --swarm-key "
                          f"{out}`) and to the members you trust with it, or make each member a key of its own "
                          f"(`swarm keygen --member-of {out} --out NAME.key`)", highlight=False)
    else:
        err_console.print(f"wrote a member key to {out} for its holder (`swarm chat ... --swarm-key {out.name}`); "
                          f"admit it by copying {pub} into the servers' --allowed-keys directory, revoke it by "
                          "removing it from there", highlight=False)
