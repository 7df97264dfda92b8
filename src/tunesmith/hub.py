"""Is the Hugging Face hub reachable? Asked once, quickly, so offline machines fail fast with advice."""

from __future__ import annotations

import os
import re
import socket

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLINE_VALUES = ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when an offline switch is set or huggingface.co:443 does not answer within ``timeout``."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").lower() in _OFFLINE_VALUES:
            return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False
