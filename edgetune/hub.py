"""The Hugging Face hub as an input: an unreachable hub is bad input (one line, exit 2), not a
crash after minutes of retries.

`hub_access(what, fix)` wraps a hub download: before it, a 3-second TCP probe of the endpoint
(skipped in offline mode, where a warm cache may serve, and behind a proxy); around it, the
network errors of datasets / huggingface_hub / transformers become one BadInput naming the
dataset or model id and the fix.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from contextlib import contextmanager

from edgetune.config import BadInput

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
NETWORK_ERRORS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                  "ReadTimeout", "NameResolutionError", "MaxRetryError", "TransportError")


def offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENV)


def unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the hub endpoint cannot be reached (offline mode, DNS, refused, timeout), or None."""
    if offline():
        return "offline mode: " + ", ".join(k for k in OFFLINE_ENV if os.environ.get(k))
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if urllib.request.getproxies().get(url.scheme) and not urllib.request.proxy_bypass(url.hostname or ""):
        return None  # only the proxy is reachable from here: let the download try
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
    except OSError as e:
        return f"{url.hostname}: {e.strerror or e.__class__.__name__}"
    return None


def is_network_error(e: BaseException) -> bool:
    chain = [e, e.__cause__, e.__context__]
    return any(isinstance(x, (ConnectionError, TimeoutError)) or type(x).__name__ in NETWORK_ERRORS
               for x in chain if x is not None)


def require_hub(what: str, fix: str) -> None:
    """Fail fast when the hub endpoint does not answer (not in offline mode: a cache may serve)."""
    reason = None if offline() else unreachable_reason()
    if reason:
        raise BadInput(f"cannot reach the Hugging Face hub for {what} ({reason}); {fix}")


@contextmanager
def hub_access(what: str, fix: str):
    """Run a hub download of `what` (e.g. "dataset 'stanfordnlp/sst2'"); a hub that cannot be
    reached ends it as BadInput: "cannot reach the Hugging Face hub for <what> (<why>); <fix>"."""
    require_hub(what, fix)
    try:
        yield
    except Exception as e:
        if not is_network_error(e):
            raise
        why = f"offline mode, not in the local cache" if offline() else e.__class__.__name__
        raise BadInput(f"cannot reach the Hugging Face hub for {what} ({why}); {fix}") from None
