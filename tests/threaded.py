"""A real aiohttp server on 127.0.0.1 in its own thread and event loop, for synchronous tests (Hypothesis and
Schemathesis call it with blocking clients, which would stall a server on the test's own loop)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiohttp import web

__all__ = ["ThreadedApp"]


class ThreadedApp:
    """`with ThreadedApp(make_app) as url:` serves the app that `make_app` builds (in the server's thread) at `url`
    (on `port`, or a free one)."""

    def __init__(
        self, make_app: Callable[[], web.Application], *, timeout: float = 30.0, port: int = 0, **runner_options: Any
    ):
        self._make_app = make_app
        self._port = port
        self._options = runner_options
        self._timeout = timeout
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="threaded-app", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.url = ""

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError(f"the app did not start within {self._timeout}s")
        if self._error is not None:
            raise self._error
        return self.url

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self._timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread by __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        # Built here: the app's cleanup contexts (database, NATS) belong to this loop.
        runner = web.AppRunner(self._make_app(), **self._options)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", self._port)
            await site.start()
            self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            self._ready.set()
            await self._stop.wait()
        finally:
            await runner.cleanup()
