"""The node's etiquette for C-FINDs made outside a retrieval (a worklist resolve: thousands of queries).

A retrieval's finds go through its Governor; a resolve has no transfer to window or rate-limit, but it
must not be the 50,000-query storm a PACS administrator objects to. `FindGate` gives it the parts of
the node's policy that apply to queries:

- every C-FIND holds one of the node's association slots (`max_associations`), the same slots the
  node's retrievals take, so a resolve and a retrieval together stay within the limit;
- the node's adaptive backoff: a retry, or a retriable failure at the end of the retry layer, is
  pushback that raises the node's level; each find waits the level's delay first, and successes
  lower it again;
- `unreachable_stop` finds in a row that could not reach the PACS at all end the run (the caller
  leaves the rest for a later resolve) instead of paying a growing delay per remaining row.

Transfer windows do not apply to queries (documented in docs/pacs-etiquette.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.errors import RetriableDicomError
from app.policy.backoff import node_backoff
from app.policy.clock import SYSTEM_CLOCK
from app.policy.limits import node_limits
from app.policy.schema import policy_of


class PacsUnreachable(Exception):
    """`unreachable_stop` finds in a row could not reach the PACS at all."""


class FindGate:
    def __init__(self, ctx, node, *, sleep: Callable[[float], None] = time.sleep, unreachable_stop: int = 5):
        policy = policy_of(getattr(node, "options", None))
        self.limits = node_limits(ctx, node.name, policy, SYSTEM_CLOCK)
        self.backoff = node_backoff(ctx, node.name, policy.backoff.config())
        self._sleep = sleep
        self.unreachable_stop = unreachable_stop
        self._unreachable = 0
        self.stats = {"finds": 0, "backoffs": 0, "backoff_wait_s": 0.0}

    def _wait(self, seconds: float) -> None:
        if seconds > 0:
            self.stats["backoff_wait_s"] += seconds
            self._sleep(seconds)

    def retry_sleep(self, seconds: float) -> None:
        """The SCU's retry-layer sleep (hand it to DicomClient): every retry is pushback."""
        self.backoff.pressure()
        self.stats["backoffs"] += 1
        self._wait(max(seconds, self.backoff.delay()))

    def find(self, client, level: str, query: dict, **kw):
        """`client.find(level, query, **kw)` under the node's etiquette; raises what it raises."""
        self._wait(self.backoff.delay())
        self.stats["finds"] += 1
        try:
            with self.limits.association():
                res = client.find(level, query, **kw)
        except RetriableDicomError as exc:
            self.backoff.pressure()
            self.stats["backoffs"] += 1
            if getattr(exc, "unreachable", False):
                self._unreachable += 1
                if self._unreachable >= self.unreachable_stop:
                    raise PacsUnreachable(exc.message) from exc
            raise
        self._unreachable = 0
        self.backoff.success()
        return res
