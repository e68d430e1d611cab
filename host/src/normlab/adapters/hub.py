"""Adapter: timm's pretrained weights without a network.

Asked for weights it does not have cached, huggingface_hub 2.4 retries the
unreachable Hub with back-off for about a minute, logging a "Retrying in Ns"
line each time (22 lines, 54 s measured), before timm's call fails. When the
Hub's host neither resolves nor answers within a few seconds,
:func:`offline_unless_reachable` turns the hub's offline mode on for the call
(``huggingface_hub.constants.HF_HUB_OFFLINE``, read at each request): cached
weights load as usual and missing ones fail at once, so normlab's one-line
error follows without the wait. Nothing changes where ``HF_HUB_OFFLINE`` is
already set, where a proxy is configured (the probe would not go through it)
or where the host answers.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


def reachable(endpoint: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether ``endpoint``'s host resolves and accepts a TCP connection within ``timeout`` seconds."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname or "", url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within the block, the Hub in offline mode if it cannot be reached; yields whether it was switched."""
    from huggingface_hub import constants

    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    if constants.HF_HUB_OFFLINE or proxied or reachable(constants.ENDPOINT):
        yield False
        return
    constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE = False
