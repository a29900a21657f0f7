"""A TLS endpoint in front of a local redis-server, as stunnel or a managed Redis's
TLS front puts one: the redis-server bundled here is built without TLS, so the
TLS session ends one local hop before it. Clients speak real TLS, with a CA of
their own to trust, and see a real Redis behind it."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from pathlib import Path

import trustme


class TlsProxy:
    def __init__(self, backend_port: int, directory: Path) -> None:
        authority = trustme.CA()
        self.ca_path = directory / "ca.pem"
        authority.cert_pem.write_to_path(str(self.ca_path))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        authority.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self.backend_port = backend_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def start(self) -> TlsProxy:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _listen(self) -> asyncio.AbstractServer:
        return await asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._context)

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        backend_in, backend_out = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            writer.close()

        try:
            await asyncio.gather(pump(client_in, backend_out), pump(backend_in, client_out))
        finally:
            client_out.close()
            backend_out.close()

    async def _shutdown(self) -> None:
        """Close the listener and end the relays still open (clients' pooled connections)."""
        if self._server is not None:
            self._server.close()
        relays = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> TlsProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
