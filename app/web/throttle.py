"""Failed console sign-ins per client address: a brute force of API tokens through /login gets 429.

`limits`' moving window in process memory: no service to run, and the API is one process. Behind a
reverse proxy the client address is the proxy's unless uvicorn is told to trust its forwarded headers
(`--proxy-headers --forwarded-allow-ips`); then every user behind it shares one allowance.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItemPerSecond
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter


class LoginThrottle:
    """At most `failures` failed sign-ins per address in any `window_s` seconds."""

    def __init__(self, failures: int, window_s: int):
        self.item = RateLimitItemPerSecond(failures, window_s)
        self.limiter = MovingWindowRateLimiter(MemoryStorage())

    def retry_after(self, address: str) -> int | None:
        """Seconds until `address` may try again; None while it still has attempts left."""
        if self.limiter.test(self.item, "console-login", address):
            return None
        reset = self.limiter.get_window_stats(self.item, "console-login", address).reset_time
        return max(1, math.ceil(reset - time.time()))

    def failed(self, address: str) -> None:
        self.limiter.hit(self.item, "console-login", address)
