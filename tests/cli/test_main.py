"""Usage and configuration errors of the command line (docs/OPERATIONS.md#commands, #exit-codes) as
real processes: exit 2 (or 1 when a retry may succeed) and one line naming the key or flag, never a
traceback. Network on 127.0.0.1 only, and no DNS."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
import trio

from daemon.core.config import ServerConfig
from daemon.runtime.ingest import listen_problem
from store.db import Store
from tests.support.daemon_process import running_daemon, write_config
from tests.support.paths import REPO

pytestmark = pytest.mark.slow

EVENT: Final = json.dumps({"event": "pump.started", "resource": {"prefect.resource.id": "pump.7"}})

# Test-only TLS material (self-signed EC P-256, CN trigd-test, valid until 2126).
CERT: Final = """-----BEGIN CERTIFICATE-----
MIIBgDCCASegAwIBAgIUDF9OTFEEsBln4+hb2SOqUy8gBjIwCgYIKoZIzj0EAwIw
FTETMBEGA1UEAwwKdHJpZ2QtdGVzdDAgFw0yNjEyMDMwNzQyNTFaGA8yMTI2MTEw
OTA3NDI1MVowFTETMBEGA1UEAwwKdHJpZ2QtdGVzdDBZMBMGByqGSM49AgEGCCqG
SM49AwEHA0IABFr5r+L9IpTNju9R4ku5GD6KYcgt1/bwWtaPiUF71Z0CoLASXenA
1VGBZnEjOtTADgCRsf3ZV32hpuMhrRq21pajUzBRMB0GA1UdDgQWBBTH4YSKcZPr
V3j+LMkBx+jsbWzsGTAfBgNVHSMEGDAWgBTH4YSKcZPrV3j+LMkBx+jsbWzsGTAP
BgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0cAMEQCICG59z4rQL63gyzl+Gnc
Ap52vGhEjTlF2cch/o/Jh87LAiAh0qEU5aD7TIrATryDPQmvIxZlKsmhIOA76JNT
s0DXlg==
-----END CERTIFICATE-----
"""
KEY: Final = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgaZZ5Fte8YCMFqIMK
4JcZnwL4P6cGxcSuvfSCPBbw+HOhRANCAARa+a/i/SKUzY7vUeJLuRg+imHILdf2
8FrWj4lBe9WdAqCwEl3pwNVRgWZxIzrUwA4AkbH92Vd9oabjIa0attaW
-----END PRIVATE KEY-----
"""
OTHER_KEY: Final = """-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3nEXw2v9sPckQSTB
NfkNvCZiWGKwFkm3mZ5j84X4CcWhRANCAATihhI6YtRoHU2BHlVI+JWJ374jMFvT
z/gkuqCWynu+1f1w8ZvIpZxAnUMzmDdUOFUzMFbZNQ8NaxxVuWgQSy57
-----END PRIVATE KEY-----
"""
ENCRYPTED_KEY: Final = """-----BEGIN ENCRYPTED PRIVATE KEY-----
MIHsMFcGCSqGSIb3DQEFDTBKMCkGCSqGSIb3DQEFDDAcBAg5Zi2T5fBGzAICCAAw
DAYIKoZIhvcNAgkFADAdBglghkgBZQMEASoEEGkGkLDL5tC/wLMJXNEpbBMEgZDe
cU4s6YcfUPjhzy0+P8G/fDJnu+JoDxTCDm3so4jHfmoGVbPXWxD0TTpBOUSCPrur
dBomkfkLL9zozUBBiO8lrubj9idC+leORafczj7M+M5e4TwDikOVq1XjcwE21dBs
v/xc5Yt7SZWgp82ZQVTUqjrqiqquyHpSlGbG+lIhCv5ChuirIxe0usJEHuMzOqU=
-----END ENCRYPTED PRIVATE KEY-----
"""
"""KEY encrypted with the passphrase "secret"."""


def trigd(*args: str, cwd: Path = REPO, stdin: str = "") -> tuple[int, str, str]:
    """Run this checkout's trigd to its end (bounded); (exit code, stdout, stderr)."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "daemon", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": python_path},
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout, result.stderr


def failure(*args: str, stdin: str = "") -> tuple[int, str]:
    """A trigd run expected to fail: its exit code and the last line of stderr, which is
    the whole report (no traceback before it)."""
    code, _, err = trigd(*args, stdin=stdin)
    assert "Traceback" not in err, err
    return code, err.splitlines()[-1]


@contextmanager
def port_in_use() -> Iterator[int]:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def closed_port() -> int:
    """A port nobody listens on (bound and released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- trigd serve: settings that fail as start-up uses them ---------------------------------


def test_listen_port_in_use_exits_1_naming_listen(tmp_path: Path) -> None:
    """Another process holding the port is in the way for now, not a bad value: exit 1, so
    that systemd's Restart=on-failure tries again (RestartPreventExitStatus=2)."""
    config = write_config(tmp_path)
    with port_in_use() as port:
        result = failure("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}")
    assert result == (
        1,
        f"trigd serve: [server] listen (--listen) 127.0.0.1:{port}: address already in use",
    )


def test_listen_address_of_another_host_exits_2(tmp_path: Path) -> None:
    if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() != "0":
        pytest.skip("this host lets a socket bind any address")
    config = write_config(tmp_path, server={"listen": "192.0.2.1:4391"})  # TEST-NET-1
    assert failure("serve", "--config", str(config)) == (
        2,
        "trigd serve: [server] listen (--listen) 192.0.2.1:4391: "
        "192.0.2.1 is not an address of this host",
    )


def test_an_unresolvable_listen_host_is_lasting_unless_the_failure_is_temporary() -> None:
    """(No DNS in tests: the errors the resolver raises, as trio passes them on.)"""
    settings = ServerConfig(listen="nosuchhost.invalid:4391")
    unknown = listen_problem(
        settings, socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    )
    assert unknown.lasting
    assert str(unknown) == (
        "[server] listen (--listen) nosuchhost.invalid:4391: "
        "cannot resolve host 'nosuchhost.invalid' (Name or service not known)"
    )
    later = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert not listen_problem(settings, later).lasting


@pytest.mark.parametrize(
    ("cert", "key", "blamed", "why"),
    [
        ("not a certificate\n", KEY, "tls_cert", "not a PEM certificate"),
        (KEY, KEY, "tls_cert", "not a PEM certificate"),
        (CERT, "not a key\n", "tls_key", "not a PEM private key"),
        (CERT, CERT, "tls_key", "not a PEM private key"),
        (CERT, OTHER_KEY, "tls_key", "not the private key of {cert}"),
        (
            CERT,
            ENCRYPTED_KEY,
            "tls_key",
            "encrypted with a passphrase; trigd needs the key unencrypted",
        ),
    ],
    ids=["garbage-cert", "key-as-cert", "garbage-key", "cert-as-key", "other-key", "encrypted-key"],
)
def test_tls_files_that_cannot_serve_exit_2_naming_the_file(
    tmp_path: Path, cert: str, key: str, blamed: str, why: str
) -> None:
    files = {"tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem"}
    files["tls_cert"].write_text(cert)
    files["tls_key"].write_text(key)
    config = write_config(tmp_path, server={k: str(v) for k, v in files.items()})
    assert failure("serve", "--config", str(config)) == (
        2,
        f"trigd serve: [server] {blamed} {files[blamed]}: {why.format(cert=files['tls_cert'])}",
    )
    assert not (tmp_path / "trigd.db").exists()  # checked before the database is opened


def test_a_certificate_openssl_finds_too_weak_is_blamed_on_tls_cert(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # below level 2
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    files = {"tls_cert": tmp_path / "cert.pem", "tls_key": tmp_path / "key.pem"}
    files["tls_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["tls_key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = write_config(tmp_path, server={k: str(v) for k, v in files.items()})
    code, message = failure("serve", "--config", str(config))
    assert code == 2
    assert message.startswith(
        f"trigd serve: [server] tls_cert {files['tls_cert']}: refused by OpenSSL as too weak"
    ), message


async def test_a_certificate_and_its_key_serve_wss(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text(CERT)
    (tmp_path / "key.pem").write_text(KEY)
    config = write_config(tmp_path, server={"tls_cert": "cert.pem", "tls_key": "key.pem"})
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            assert f"trigd listening on wss://127.0.0.1:{daemon.port}" in daemon.log
            assert await daemon.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda path: path.mkdir(), "is a directory, not a database file"),
        (lambda path: path.write_text("name,value\n"), "not a SQLite database"),
        (lambda path: None, "directory {parent} does not exist"),
    ],
    ids=["directory", "not-sqlite", "no-directory"],
)
def test_database_path_that_cannot_hold_a_database_exits_2_naming_db(
    tmp_path: Path, make: Callable[[Path], object], why: str
) -> None:
    db = tmp_path / ("absent/trigd.db" if "parent" in why else "trigd.db")
    make(db)
    config = write_config(tmp_path)
    assert failure("serve", "--config", str(config), "--db", str(db)) == (
        2,
        f"trigd serve: [store] path (--db) {db}: {why.format(parent=db.parent)}",
    )


# --- trigd emit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:4391/api", "is not a websocket URL: the scheme must be ws:// or wss://"),
        ("127.0.0.1:4391", "is not a websocket URL"),
        ("ws:///api/events/in", "has no host"),
        ("ws://127.0.0.1:99999/api", "is not a valid URL: Port out of range"),
    ],
)
def test_emit_url_that_is_not_a_websocket_url_exits_2_naming_the_flag(url: str, why: str) -> None:
    code, line = failure("emit", "--url", url, stdin=EVENT)
    assert code == 2
    assert line.startswith(f"trigd emit: error: argument --url: {url!r} {why}"), line


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon"])
def test_emit_timeout_must_be_seconds_above_zero(timeout: str) -> None:
    code, line = failure("emit", "--timeout", timeout, stdin=EVENT)
    assert code == 2
    assert line.startswith("trigd emit: error: argument --timeout: "), line
    assert repr(timeout) in line


def test_emit_to_a_closed_port_says_connection_refused() -> None:
    url = f"ws://127.0.0.1:{closed_port()}/api/events/in"
    assert failure("emit", "--url", url, stdin=EVENT) == (
        1,
        f"trigd emit: {url}: connection refused",
    )


async def test_emit_says_why_the_daemon_refused_it(tmp_path: Path) -> None:
    config = write_config(tmp_path, server={"auth_token": "s3cret"})
    with trio.fail_after(60):
        async with running_daemon(config) as daemon:
            wrong_token = await trio.to_thread.run_sync(
                lambda: failure("emit", "--url", daemon.url, "--token", "nope", stdin=EVENT)
            )
            assert wrong_token == (
                1,
                f"trigd emit: {daemon.url}: the server closed the connection: 1008 Invalid token",
            )
            url = daemon.url.replace("/api/events/in", "/elsewhere")
            wrong_path = await trio.to_thread.run_sync(
                lambda: failure("emit", "--url", url, "--token", "s3cret", stdin=EVENT)
            )
            assert wrong_path[0] == 1
            assert wrong_path[1].startswith(
                f"trigd emit: {url}: the server refused the websocket: HTTP 404"
            )
            assert await daemon.stop() == 0


# --- trigd outbox --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["outbox", "--db", "{db}", "list"],
        ["outbox", "list", "--db", "{db}"],
        ["outbox", "list", "--status", "dead", "--db", "{db}", "--limit", "5"],
        ["outbox", "--db", "{db}", "retry", "--dead"],
        ["outbox", "retry", "--db", "{db}", "--dead"],
        ["outbox", "--config", "{config}", "list"],
        ["outbox", "list", "--config", "{config}"],
        ["outbox", "--db", "elsewhere.db", "list", "--db", "{db}"],  # the later one wins
    ],
)
def test_outbox_options_go_before_or_after_the_action(tmp_path: Path, argv: list[str]) -> None:
    """The database is not in the working directory, so only the one named is found."""
    db = tmp_path / "data" / "trigd.db"
    db.parent.mkdir()
    Store.open(db).close()
    config = tmp_path / "trigd.toml"
    config.write_text(f"[store]\npath = {json.dumps(str(db))}\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    args = [arg.format(db=db, config=config) for arg in argv]
    code, out, err = trigd(*args, cwd=cwd)
    assert (code, err) == (0, "")
    assert out.startswith("id\tstatus") or out == "0 dead deliveries put back to pending\n"
