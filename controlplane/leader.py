"""Leader election among the control planes that share one etcd.

Exactly one control plane leads: it runs the reconciler and makes every placement write. The others
follow: they serve registration, node and routing streams and admin reads from their own fleet view, and
send writes to the leader.

The election is one etcd key (the store's `election/controlplane`), created in a transaction only if it
is absent, under a lease of the winner's (`leader_ttl_seconds`, 3 s by default) that it renews every third
of the TTL. Its value is the leader's address (where followers forward writes); its create revision is
the leader's fencing token: each write made in the leader's role is a transaction that compares it
(`ClusterStore.put(..., fence=...)`). A leader paused past its lease (SIGSTOP, a long GC, a VM stall)
comes back believing it leads, but the key it created is gone, so its first fenced write is refused
(FencedOut) and it steps down: it cannot write placements decided on what it knew before the pause.

Followers watch the key and campaign as soon as it is deleted (a leader that stops cleanly revokes its
lease at once; one that dies loses it when the TTL runs out), and re-read it every TTL in case a watch
event was lost. Failover therefore takes about one TTL after a crash and almost nothing after a stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from controlplane.store import ClusterStore, Fence, FencedOut, StoreUnavailable
from mesh.errors import FleetError
from mesh.lifecycle import cancelled_by_caller

log = logging.getLogger(__name__)

ELECTION = "controlplane"


def _first(exc: BaseException) -> BaseException:
    """The first failure inside a task group's (the election's watch pump and its campaign run in one)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _reason(exc: BaseException) -> str:
    """What went wrong, for a log line; the kind of an error that has no message (a timeout)."""
    first = _first(exc)
    if isinstance(first, FleetError):
        return first.message
    return str(first) or type(first).__name__


class Leadership:
    def __init__(self, store: ClusterStore, address: str, ttl_seconds: int = 3) -> None:
        self._store = store
        self.address = address  # where other control planes reach this one
        self._ttl = ttl_seconds
        self._fence: Fence | None = None
        self._lease = 0
        self.leader_address = ""  # "" while no one is known to lead
        self.leader_revision = 0
        self.elected = asyncio.Event()  # set while this control plane leads
        self._lost = asyncio.Event()  # set when a term ends (lease lapsed, fenced write refused)
        self.stopping = False  # set by a clean shutdown: the term it ends is handed over, not lost

    @property
    def is_leader(self) -> bool:
        return self._fence is not None

    def fence(self) -> Fence:
        """The token for a write in the leader's role; FencedOut when this control plane does not lead."""
        if self._fence is None:
            raise FencedOut("this control plane is not the leader")
        return self._fence

    def step_down(self, why: str) -> None:
        """End this term now (a fenced write was refused, the lease could not be renewed in time)."""
        if self._fence is None:
            return
        if self.stopping:  # a clean stop hands the leadership over: nothing went wrong
            log.info("handing over the leadership (fencing revision %d): shutting down", self._fence.revision)
        else:
            log.warning("no longer the leader (fencing revision %d): %s", self._fence.revision, why)
        self._fence = None
        self.leader_address, self.leader_revision = "", 0
        self.elected.clear()
        self._lost.set()

    async def run(self) -> None:
        """Campaign, lead, follow, campaign again, until cancelled."""
        backoff = 0.5
        while True:
            try:
                await self._elect()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # etcd unreachable: whatever we held is in doubt
                if cancelled_by_caller():
                    # Cancelled (the stop) as the election watch failed (etcd stopping beside it, say): 3.11's
                    # TaskGroup then raises the watch's failure, and the cancellation it leaves pending is never
                    # raised again; the loop went on, and the control plane's stop waited for it until its
                    # deadline. It ends here, as the cancellation meant.
                    raise asyncio.CancelledError from exc
                why = _reason(exc)
                self.step_down(f"etcd failed: {why}")
                # An etcd that cannot be reached is said once by the store, not at every try here.
                level = logging.DEBUG if isinstance(_first(exc), StoreUnavailable) else logging.WARNING
                log.log(level, "election failed (%s); trying again in %.1fs", why, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _elect(self) -> None:
        # The watch exists before the first read, so a vacancy between the two is not missed. A task pumps
        # it into an event: a timeout must never cancel the watch's own iterator, which would end it.
        events = await self._store.watch_election(ELECTION)
        changed = asyncio.Event()

        async def pump() -> None:
            async for _ in events:
                changed.set()
            raise ConnectionError("the election watch ended")

        async with asyncio.TaskGroup() as tasks:
            pumping = tasks.create_task(pump())
            try:
                while True:
                    lease = await self._store.grant_lease(self._ttl)
                    fence = await self._store.campaign(ELECTION, self.address, lease)
                    if fence is None:
                        await self._store.revoke_lease(lease)
                        await self._follow(changed)
                    else:
                        await self._lead(fence, lease)
            finally:
                pumping.cancel()

    async def _follow(self, changed: asyncio.Event) -> None:
        """Until the key is vacant: keep `leader_address` current. Each watch event (or every TTL, in case
        one was lost) triggers a fresh read."""
        while True:
            changed.clear()
            holder = await self._store.holder(ELECTION)
            if holder is None:
                self.leader_address, self.leader_revision = "", 0
                return
            if holder.value != self.leader_address:
                log.info("following the leader at %s (fencing revision %d)", holder.value, holder.revision)
            self.leader_address, self.leader_revision = holder.value, holder.revision
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._ttl):  # not wait_for: it can swallow a cancellation on 3.11
                    await changed.wait()

    async def _lead(self, fence: Fence, lease: int) -> None:
        self._fence, self._lease = fence, lease
        self.leader_address, self.leader_revision = self.address, fence.revision
        self._lost.clear()
        self.elected.set()
        log.info("leading the control planes (fencing revision %d)", fence.revision)
        loop = asyncio.get_running_loop()
        renewed_at = loop.time()
        try:
            while self._fence is fence:
                # Renew at a third of the TTL; give up leading once a whole TTL has passed with no renewal:
                # the lease may be gone, and another control plane may lead by now.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._ttl / 3):
                        await self._lost.wait()
                if self._fence is not fence:
                    break
                if loop.time() - renewed_at > self._ttl:
                    self.step_down(f"the lease was not renewed for {loop.time() - renewed_at:.1f}s")
                    break
                try:
                    async with asyncio.timeout(self._ttl / 3):
                        alive = await self._store.refresh_lease(lease)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("renewing the leader lease failed: %s", _reason(exc))
                    continue
                if not alive:
                    self.step_down("the leader lease expired")
                    break
                renewed_at = loop.time()
        finally:
            if self._fence is fence:
                self.step_down("the election loop ended")
            with contextlib.suppress(Exception):
                await self._store.revoke_lease(lease)

    async def resign(self) -> None:
        """Stop leading now (at shutdown), so that another control plane takes over without waiting for the
        lease to run out."""
        lease, leading = self._lease, self.is_leader
        self.step_down("shutting down")
        if leading:
            with contextlib.suppress(Exception):
                await self._store.revoke_lease(lease)

    def describe(self) -> tuple[str, int]:
        """(leader address, fencing revision) as this control plane sees them now."""
        return self.leader_address, self.leader_revision
