"""Websockets bridged to a guest's unix sockets: the serial console and the VNC display.

QEMU's console socket serves one client at a time, so the server holds one connection per
guest (a `ConsoleHub`) and fans its output out to every viewer; what any viewer types goes
in. A viewer that joins first gets the tail of serial.log (QEMU's log of the same console),
so the screen is not empty. The hub closes its connection when the last viewer leaves,
which frees the socket for `kvmrun console`. VNC needs no hub: QEMU's VNC server takes
several clients, so each websocket gets its own connection, bytes passed both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from aiohttp import WSMsgType, web

TAIL_BYTES = 16 * 1024
CHUNK = 65536


def log_tail(path: Path, size: int = TAIL_BYTES) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - size))
            return f.read()
    except OSError:
        return b""


class ConsoleHub:
    """One connection to a guest's console socket, shared by its viewers."""

    def __init__(self, name: str, socket_path: Path, log_path: Path, on_empty):
        self.name = name
        self.socket_path = socket_path
        self.log_path = log_path
        self.viewers: set[web.WebSocketResponse] = set()
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self._on_empty = on_empty

    async def join(self, ws: web.WebSocketResponse) -> None:
        if self.task is None:
            reader, self.writer = await asyncio.open_unix_connection(str(self.socket_path))
            self.task = asyncio.create_task(self._pump(reader))
        await ws.send_bytes(log_tail(self.log_path))
        self.viewers.add(ws)

    async def leave(self, ws: web.WebSocketResponse) -> None:
        self.viewers.discard(ws)
        if not self.viewers:
            await self.close()

    async def type(self, data: bytes) -> None:
        if self.writer is not None:
            self.writer.write(data)
            await self.writer.drain()

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                for ws in list(self.viewers):
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.send_bytes(data)
        except (ConnectionError, OSError):
            pass
        for ws in list(self.viewers):                   # the guest stopped: tell the pages
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.close(code=4000, message=b"console closed")
        self.task = None
        await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            self.writer = None
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
            self.task = None
        self._on_empty(self.name)


class Consoles:
    """The hubs of all guests being watched."""

    def __init__(self):
        self.hubs: dict[str, ConsoleHub] = {}

    def hub(self, name: str, socket_path: Path, log_path: Path) -> ConsoleHub:
        if name not in self.hubs:
            self.hubs[name] = ConsoleHub(name, socket_path, log_path, self._forget)
        return self.hubs[name]

    def _forget(self, name: str) -> None:
        hub = self.hubs.get(name)
        if hub is not None and not hub.viewers and hub.writer is None:
            del self.hubs[name]

    async def serve(self, ws: web.WebSocketResponse, name: str, socket_path: Path,
                    log_path: Path) -> None:
        hub = self.hub(name, socket_path, log_path)
        try:
            await hub.join(ws)
        except OSError as e:
            await ws.close(code=4004, message=f"no console: {e.strerror}".encode()[:120])
            self._forget(name)
            return
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await hub.type(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await hub.type(msg.data.encode())
        finally:
            await hub.leave(ws)

    async def close_all(self) -> None:
        for hub in list(self.hubs.values()):
            for ws in list(hub.viewers):
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.close(code=1001, message=b"server stopping")
            await hub.close()


async def vnc_bridge(ws: web.WebSocketResponse, socket_path: Path) -> None:
    """RFB bytes between noVNC and QEMU's VNC unix socket, until either side closes."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError as e:
        await ws.close(code=4004, message=f"no display: {e.strerror}".encode()[:120])
        return

    async def to_browser() -> None:
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)
        await ws.close(code=4000, message=b"display closed")

    pump = asyncio.create_task(to_browser())
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                writer.write(msg.data)
                await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        pump.cancel()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
