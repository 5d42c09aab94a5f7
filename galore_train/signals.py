"""Ctrl-C and SIGTERM (a cluster's pre-emption) as a request to stop cleanly: finish the step, save, exit."""

from __future__ import annotations

import signal
from typing import Any, Optional


class StopRequest:
    """Turns SIGINT/SIGTERM into 'finish this step, save, exit'; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
