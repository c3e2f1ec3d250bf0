"""A capacity limiter that serves demand requests before prefetch requests.

trio's `CapacityLimiter` is first come, first served, so a reader's request
would queue behind every prefetch request already waiting. Here each waiter
holds a `Ticket` with a priority that may be raised while it waits: a
prefetch that a reader starts waiting on moves to the front.
"""

import collections

import trio

DEMAND = 0
PREFETCH = 1


class Ticket:
    """One request for a slot; its *priority* may be raised while it waits."""

    def __init__(self, priority: int):
        self.priority = priority
        # The priority the request was made with, before any raise.
        self.started_as = priority
        self._granted = trio.Event()


class PriorityLimiter:
    def __init__(self, total: int):
        self.total = total
        self._free = total
        self._queues: dict[int, collections.deque[Ticket]] = {
            DEMAND: collections.deque(),
            PREFETCH: collections.deque(),
        }

    @property
    def in_use(self) -> int:
        return self.total - self._free

    def waiting(self, priority: int) -> int:
        return len(self._queues[priority])

    async def acquire(self, ticket: Ticket) -> None:
        if self._free > 0 and not self._has_waiters_before(ticket.priority):
            self._free -= 1
            await trio.lowlevel.checkpoint()
            return
        ticket._granted = trio.Event()
        self._queues[ticket.priority].append(ticket)
        try:
            await ticket._granted.wait()
        except BaseException:
            if ticket._granted.is_set():
                # The slot was handed over just as the wait was cancelled.
                self.release()
            else:
                self._queues[ticket.priority].remove(ticket)
            raise

    def raise_priority(self, ticket: Ticket) -> None:
        """Move a waiting prefetch *ticket* ahead of every prefetch request."""
        if ticket.priority == DEMAND:
            return
        queue = self._queues[ticket.priority]
        if ticket in queue:
            queue.remove(ticket)
            self._queues[DEMAND].append(ticket)
        ticket.priority = DEMAND

    def release(self) -> None:
        for priority in (DEMAND, PREFETCH):
            queue = self._queues[priority]
            if queue:
                queue.popleft()._granted.set()
                return
        self._free += 1

    def _has_waiters_before(self, priority: int) -> bool:
        if self._queues[DEMAND]:
            return True
        return priority == PREFETCH and bool(self._queues[PREFETCH])
