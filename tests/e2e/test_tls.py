"""`tls_cert` and `tls_key` (docs/PROTOCOL.md#endpoint-and-paths): the real daemon serves wss://
with them, and a client that trusts the certificate's CA gets through; one that speaks plain ws://
does not.

The certificates come from trustme (a throwaway CA, a leaf for 127.0.0.1); `trigd emit`
trusts the CA through OpenSSL's SSL_CERT_FILE, as an operator with a private CA would.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
from pathlib import Path

import apsw
import pytest
import trio
import trustme
from trio_websocket import open_websocket_url

from tests.support.daemon_process import LISTENING, running_daemon, write_config

pytestmark = pytest.mark.slow


def tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate chain, server key) as PEM files."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca_pem, chain_pem, key_pem = (directory / name for name in ("ca.pem", "chain.pem", "key.pem"))
    ca.cert_pem.write_to_path(str(ca_pem))
    leaf.private_key_pem.write_to_path(str(key_pem))
    chain_pem.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return ca_pem, chain_pem, key_pem


async def test_tls_serves_wss_to_a_client_that_trusts_its_ca(tmp_path: Path) -> None:
    ca_pem, chain_pem, key_pem = tls_files(tmp_path)
    config = write_config(tmp_path, server={"tls_cert": str(chain_pem), "tls_key": str(key_pem)})
    event_id = "2f0c2bde-3d0e-4c1f-9a61-6a2d2a8f3b10"
    line = json.dumps(
        {"id": event_id, "event": "pump.started", "resource": {"prefect.resource.id": "pump.7"}}
    )
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            match = LISTENING.search(daemon.stderr)
            assert match is not None, daemon.log
            assert match.group(1) == b"wss", daemon.log
            url = f"wss://127.0.0.1:{daemon.port}/api/events/in"

            emitted = await trio.run_process(
                [sys.executable, "-m", "daemon", "emit", "--url", url],
                stdin=(line + "\n").encode(),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env={**os.environ, "SSL_CERT_FILE": str(ca_pem)},
            )
            assert emitted.returncode == 0, emitted.stderr
            assert b"1 acknowledged, 0 rejected" in emitted.stdout

            # Prefect's protocol over TLS, with the CA trusted explicitly
            context = ssl.create_default_context(cafile=str(ca_pem))
            async with open_websocket_url(url, ssl_context=context, subprotocols=["prefect"]) as ws:
                await ws.send_message(json.dumps({"type": "auth", "token": None}))
                assert json.loads(await ws.get_message()) == {"type": "auth_success"}

            # plain HTTP to the TLS port: the daemon hangs up at once, without waiting out
            # the handshake timeout (10 s) with the connection slot taken
            with trio.fail_after(5):
                stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
                await stream.send_all(
                    b"GET /api/events/in HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
                )
                while await stream.receive_some(4096):
                    pass  # whatever alert TLS sends, then the end of the stream
                await stream.aclose()
            assert await daemon.stop() == 0

    conn = apsw.Connection(str(tmp_path / "trigd.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("SELECT id FROM events").fetchall() == [(event_id,)]
    finally:
        conn.close()


async def test_a_client_that_does_not_trust_the_certificate_is_refused(tmp_path: Path) -> None:
    _, chain_pem, key_pem = tls_files(tmp_path)
    config = write_config(tmp_path, server={"tls_cert": str(chain_pem), "tls_key": str(key_pem)})
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", daemon.port, ssl_context=ssl.create_default_context()
            )
            with pytest.raises(trio.BrokenResourceError) as refused:
                await stream.do_handshake()
            assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)
            await trio.aclose_forcefully(stream)
            assert await daemon.stop() == 0
