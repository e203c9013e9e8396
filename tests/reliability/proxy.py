"""A TCP proxy on 127.0.0.1 in front of PostgreSQL that a test can cut and restore: a stand-in for stopping
the database that leaves the machine's cluster (and every other test's connections) alone.

`cut()` aborts every proxied connection (both sides) and from then on drops each new connection as soon as
it is accepted, so the service sees what a dead server gives it: broken sockets and failing connects.
`blackhole()` is the other way a database goes away — it stops answering: the open connections break (as in
a failover), and new ones are accepted and then left hanging, never a byte back, never a reset (a partition
or a frozen server, as far as a client that is connecting can tell). `restore()` lets connections through
again (resetting the ones it held).

`ProxyProcess` runs it in a process of its own (`python -m tests.reliability.proxy HOST PORT`, driven by
lines on its stdin), so that relaying the database's bytes never waits for the GIL of a busy test process.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

CHUNK = 65536
T = TypeVar("T")


class TcpProxy:
    """Forward 127.0.0.1:`port` to `upstream`; runs its own event loop in a daemon thread."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self.refused = 0
        self._open = True
        self._silent = False
        self._held: set[asyncio.WriteTransport] = set()
        self._pairs: set[tuple[asyncio.WriteTransport, asyncio.WriteTransport]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, sock=self.sock))
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.cut()

        async def close() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        try:
            self._call(close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            if not self._thread.is_alive():
                self._loop.close()

    def cut(self) -> int:
        """Break every open connection and refuse new ones; returns how many were broken."""

        async def cut() -> int:
            self._open = False
            pairs = list(self._pairs)
            for pair in pairs:
                for transport in pair:
                    transport.abort()
            self._pairs.clear()
            return len(pairs)

        return self._call(cut())

    def blackhole(self) -> int:
        """Break every open connection, then hold new ones open and silent; returns how many were broken."""
        broken = self.cut()

        async def blackhole() -> None:
            self._silent = True

        self._call(blackhole())
        return broken

    def restore(self) -> None:
        """Let connections through again (resetting the ones a blackhole held)."""

        async def restore() -> None:
            for transport in list(self._held):
                transport.abort()
            self._held.clear()
            self._open, self._silent = True, False

        self._call(restore())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._silent:
            self._held.add(writer.transport)
            return
        if not self._open:
            self.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        if not self._open:  # cut while connecting
            up_writer.transport.abort()
            writer.transport.abort()
            return
        self.accepted += 1
        pair = (writer.transport, up_writer.transport)
        self._pairs.add(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self._pairs.discard(pair)
            for transport in pair:
                transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.transport.abort()


class ProxyProcess:
    """TcpProxy in a child process: `port`, `cut()` (returns the connections broken), `blackhole()`, `restore()`."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        root = Path(__file__).parents[2]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.reliability.proxy", upstream_host, str(upstream_port)],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both are pipes
        self._stdin, self._stdout = self.proc.stdin, self.proc.stdout
        self.port = int(self._reply().removeprefix("port "))

    def cut(self) -> int:
        return int(self._ask("cut"))

    def blackhole(self) -> int:
        return int(self._ask("blackhole"))

    def restore(self) -> None:
        self._ask("restore")

    def stats(self) -> tuple[int, int]:
        """(connections let through, connections dropped during cuts) so far."""
        accepted, refused = self._ask("stats").split()
        return int(accepted), int(refused)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._stdin.close()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _ask(self, command: str) -> str:
        self._stdin.write(command + "\n")
        self._stdin.flush()
        return self._reply()

    def _reply(self) -> str:
        line = self._stdout.readline().strip()
        if not line:
            raise RuntimeError(f"the proxy process exited (code {self.proc.poll()})")
        return line


def main(argv: list[str]) -> None:
    """Serve the proxy; answer one line per command read from stdin; exit at end of input."""
    host, port = argv
    with TcpProxy(host, int(port)) as proxy:
        print(f"port {proxy.port}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "cut":
                print(proxy.cut(), flush=True)
            elif command == "blackhole":
                print(proxy.blackhole(), flush=True)
            elif command == "restore":
                proxy.restore()
                print("ok", flush=True)
            elif command == "stats":
                print(proxy.accepted, proxy.refused, flush=True)
            else:
                print(f"unknown command {command!r}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
