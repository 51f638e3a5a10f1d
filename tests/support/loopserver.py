"""A TCP server of a test's own, on 127.0.0.1, on an event loop in a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from typing import TypeVar

from support.net import free_port

S = TypeVar("S", bound="LoopServer")


class LoopServer:
    """Serves each connection with :meth:`handle` (a subclass's) on a free port of 127.0.0.1;
    :meth:`stop` cancels every connection's task and ends the thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def start(self: S) -> S:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handle, "127.0.0.1", self.port), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
