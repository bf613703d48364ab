"""The relay leader's background passes: reconciliation every `--reconcile-interval`, re-signing every few hours.

Both passes read and verify the whole bucket, so only the replica holding the
relay lease runs them; any replica still reconciles once at start-up (the
outbox drained first), as a repair after an outage, and at once after it made
the bucket's stream again (the broker found it missing): that refills it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from .api import Services
from .reconcile import reconcile
from .resign import resign
from .usage_store import prune_usage

__all__ = ["RESIGN_EVERY", "STATISTICS_EVERY", "Maintenance", "resign_every"]

log = logging.getLogger("keyrelay.publisher.maintenance")

RESIGN_EVERY = 6 * 3600.0
_DRAIN = 60.0  # how long a pass waits for the outbox to empty before it gives this round up
_IDLE = 1.0  # how often a replica that does not lead looks again
STATISTICS_EVERY = 600.0
_PRUNE_EVERY = 3600.0  # usage retention: the finest series kept is minutes for 48 hours


def resign_every(horizon: float) -> float:
    """How often to re-sign: every six hours, or often enough that a value is re-signed well within the horizon."""
    return min(RESIGN_EVERY, horizon / 8)


Job = Callable[[], Awaitable[None]]


class Maintenance:
    """Start-up reconciliation, then the leader's periodic reconcile and resign passes."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.reconciles = 0
        self.refusals = 0  # reconciliations whose plan exceeded the bound: changed nothing
        self.resigns = 0
        self.usage_prunes = 0
        self.resigned = asyncio.Event()  # set after each re-signing pass, the start-up one first
        self.settled = asyncio.Event()  # set once this replica's start-up passes are over
        self._tasks: list[asyncio.Task[None]] = []
        self._one_at_a_time = asyncio.Lock()  # two whole-bucket passes at once would only double the load

    def start(self, *, reconcile_on_start: bool) -> None:
        """Run in the background."""
        settings = self.services.settings
        self._tasks.append(asyncio.create_task(self._at_start(reconcile_on_start), name="keyrelay-at-start"))
        self._tasks.append(
            asyncio.create_task(
                self._every(settings.reconcile_interval, self.reconcile, first=settings.reconcile_interval),
                name="keyrelay-reconcile",
            )
        )
        self._tasks.append(
            asyncio.create_task(
                self._every(_PRUNE_EVERY, self.prune_usage, first=_PRUNE_EVERY), name="keyrelay-usage-retention"
            )
        )
        self._tasks.append(
            asyncio.create_task(
                self._every(resign_every(settings.replay_horizon), self.resign, first=0.0, done=self.resigned),
                name="keyrelay-resign",
            )
        )
        self._tasks.append(asyncio.create_task(self._refill(), name="keyrelay-refill"))
        self._tasks.append(asyncio.create_task(self._statistics(), name="keyrelay-statistics"))

    async def close(self) -> None:
        """Stop every pass."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)

    async def reconcile(self) -> None:
        """One reconciliation, its fixes then published."""
        s = self.services
        report = await reconcile(
            store=s.store,
            broker=s.broker,
            keys=s.keys,
            horizon=s.settings.replay_horizon,
            max_changes=s.settings.reconcile_max_changes,
        )
        self.reconciles += 1
        if report.refused is not None:
            self.refusals += 1
            log.error(
                "reconciliation refused, the bucket is left as it is: %s. Look at the plan with "
                "`keyrelay publisher reconcile --dry-run`; `--force` applies it",
                report.refused,
            )
        if report.outbox_ids:
            s.relay.wake()

    async def resign(self) -> None:
        """One re-signing pass, its values then published."""
        s = self.services
        report = await resign(store=s.store, broker=s.broker, keys=s.keys, horizon=s.settings.replay_horizon)
        self.resigns += 1
        if report.outbox_ids:
            s.relay.wake()

    async def _statistics(self) -> None:
        """The database's planner statistics, at start and every STATISTICS_EVERY: on every replica (no bucket
        involved), cheap (publisher/db_sqlite.py), and what keeps finding keys on its indexes as keys pile up."""
        while True:
            try:
                await self.services.store.db.refresh_statistics()
            except Exception as exc:  # an old plan is slower, never wrong: try again next time
                log.warning("refreshing the database's statistics failed: %s", exc)
            await asyncio.sleep(STATISTICS_EVERY)

    async def prune_usage(self) -> None:
        """Drop usage older than each series keeps (hours 30 days, days a year, minutes 48 hours)."""
        removed = await prune_usage(self.services.store.db)
        self.usage_prunes += 1
        if any(removed.values()):
            log.info("usage retention: removed %s", ", ".join(f"{n} from {t}" for t, n in removed.items() if n))

    async def _ready(self) -> bool:
        await self.services.broker.bucket_ready.wait()
        if await self.services.relay.drain(timeout=_DRAIN):
            return True
        log.warning("a bucket pass is put off: the outbox did not drain within %.0fs", _DRAIN)
        return False

    async def _at_start(self, reconcile_on_start: bool) -> None:
        relay = self.services.relay
        try:
            await relay.lease_checked.wait()
            if relay.leader:
                # The leader re-signs first: a bucket written before signing is then re-signed in passing,
                # rather than compared entry by entry as a bucket full of forgeries.
                await self.resigned.wait()
            if reconcile_on_start:
                await self._reconcile_drained()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("start-up reconciliation failed: %s (run `keyrelay publisher reconcile` later)", exc)
        finally:
            self.settled.set()

    async def _reconcile_drained(self) -> None:
        """One reconciliation once the outbox has drained (put off if it does not), one bucket pass at a time."""
        async with self._one_at_a_time:
            if await self._ready():
                await self.reconcile()

    async def _refill(self) -> None:
        """Reconcile each time the broker made the stream again: it is empty until then, sidecars fresh on it."""
        recreated = self.services.broker.recreated
        while True:
            await recreated.wait()
            recreated.clear()
            try:
                await self._reconcile_drained()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "reconciliation after the bucket was recreated failed: %s (run `keyrelay publisher "
                    "reconcile`; the periodic pass retries too)",
                    exc,
                )

    async def _every(self, interval: float, job: Job, *, first: float, done: asyncio.Event | None = None) -> None:
        due = time.monotonic() + first
        await self.services.relay.lease_checked.wait()
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if not self.services.relay.leader:
                due = time.monotonic() + _IDLE
                continue
            try:
                async with self._one_at_a_time:
                    if await self._ready():
                        await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s failed: %s (retried in %.0fs)", getattr(job, "__name__", "a pass"), exc, interval)
            finally:
                if done is not None:
                    done.set()  # run, put off or failed: who waits for it goes on
            due = time.monotonic() + interval
