"""A TCP proxy between runners and PostgreSQL that can turn into a network black hole.

It listens on 127.0.0.1 (an ephemeral port) and forwards each connection to the server's unix socket.
``black_hole(True)`` makes it stop forwarding in both directions without closing anything: new
connections are accepted and left hanging, established ones stop moving bytes (what a peer sees when
packets are silently dropped; TCP delivers what was buffered once the path is back, as retransmission
would). ``black_hole(False)`` resumes. ``reset()`` aborts every proxied connection at once.

It runs on its own event loop in a daemon thread, so whatever the test's loop is doing (or blocked
on) never stalls the forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class BlackHoleProxy:
    def __init__(self, upstream_socket: str) -> None:
        self.upstream = upstream_socket
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._open = asyncio.Event()  # set: forwarding; clear: black hole
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- control (from the test thread) ----------------------------------------------------------

    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._setup(), self._loop).result(10)
        return self.port

    def black_hole(self, on: bool) -> None:
        self._call(self._open.clear if on else self._open.set)

    def reset(self) -> None:
        """Abort every proxied connection (both sides see a reset)."""
        self._call(self._abort_all)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _call(self, fn: Any) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(10)

    # -- the proxy loop ----------------------------------------------------------------------------

    async def _setup(self) -> int:
        self._open.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            with contextlib.suppress(Exception):
                transport.abort()
        self._writers.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            pass  # the proxy is shutting down (a cancelled callback task would be logged as an error)
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._open.wait()  # in a black hole: accepted, and nothing more
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        await asyncio.gather(
            self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
        )
        for w in (writer, up_writer):
            self._writers.discard(w)
            with contextlib.suppress(Exception):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._open.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self._open.wait()  # read before the hole opened: held, not forwarded
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
                else:
                    writer.close()
