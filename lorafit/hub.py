"""The Hugging Face Hub, reached only when a model or dataset is named by its hub id.

Where the hub's host cannot be reached (a machine without network), huggingface_hub retries
each request for ~25 s before it fails, and a model load makes several. lorafit probes the host
once per process instead (a TCP connect, at most 3 s) and, when it cannot be reached, switches the
process to offline mode (`HF_HUB_OFFLINE=1`): files in the local cache still load, anything else
fails at once with lorafit's one-line error. Behind a proxy the probe is skipped, since a direct
connect says nothing about the proxied route; `HF_HUB_OFFLINE=1` set by the user skips it too.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = (
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
)


@functools.cache
def hub_reachable() -> bool:
    """False when the hub is offline for this process (set so, or found unreachable)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        _go_offline()  # the load that follows says so if it needed the hub
        return False


def _go_offline() -> None:
    """Offline mode for huggingface_hub, transformers (which asks huggingface_hub) and datasets."""
    import datasets.config
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"  # for processes started from this one
    constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
