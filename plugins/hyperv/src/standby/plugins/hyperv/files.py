"""A Hyper-V site's disk files as standby reaches them: over the site's SMB share, by the
host's own paths (`D:\\Hyper-V\\...`), differencing chains followed through their parent
locators."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from .conn import HyperVOptions
from .smb import SmbFile, SmbPool, SmbShare
from .vhdx import VhdxReader, parent_path

CONNECTIONS = 4
"""SMB connections per disk file (reads or writes in flight together)."""


def pool(opts: HyperVOptions, host_path: str, what: str, write: bool = False,
         create: bool = False, size: int = CONNECTIONS) -> SmbPool:  # fmt: skip
    """Connections to the file the host calls `host_path`; ConfigError when it is outside
    the share, NotFound when missing."""
    rel = opts.share_path(host_path, what)
    user, password = opts.smb_login()
    host = opts.smb_host or opts.host
    share, port = str(opts.share), opts.smb_port

    def opener() -> SmbFile:
        return SmbFile(host, share, rel, user, password, port=port, write=write, create=create)

    return SmbPool(opener, size)


def share(opts: HyperVOptions) -> SmbShare:
    user, password = opts.smb_login()
    return SmbShare(opts.smb_host or opts.host, str(opts.share), user, password, opts.smb_port)


def open_chain(opts: HyperVOptions, host_path: str, what: str, stack: ExitStack) -> VhdxReader:
    """A reader of the VHDX at `host_path` and of every parent under it; the connections
    close with `stack`."""

    def opener(loc: dict[str, str], child: str) -> tuple[Any, str]:
        parent = parent_path(loc, child)
        p = pool(opts, parent, f"{what}: parent of {child}")
        stack.callback(p.close)
        return p, parent

    top = pool(opts, host_path, what)
    stack.callback(top.close)
    return VhdxReader(top, host_path, opener)
