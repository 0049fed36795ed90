"""Packaging for the edge: the systemd unit, the .deb layout, the single-file executable.

The fast tests read packaging/ as it is (the unit, the example, what build-deb.sh makes of a
stand-in executable). The slow ones build the real thing with ``make binary deb`` (about a
minute of PyInstaller) and run it end to end; they only run with TEST_PACKAGING=1.
Network on 127.0.0.1 only; every wait bounded.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Final

import pytest
import trio
from standardwebhooks import Webhook

from daemon import __version__
from daemon.cli.check import check_command
from tests.support.daemon_process import (
    SECRET,
    burst_automation,
    running_daemon,
    write_automations,
    write_config,
)
from tests.support.paths import REPO
from tests.support.webhook_receiver import Receiver, answer, run_receiver

ROOT: Final = REPO
PACKAGING: Final = ROOT / "packaging"
UNIT: Final = PACKAGING / "trigd.service"
EXAMPLE: Final = PACKAGING / "examples" / "example.yaml"
BINARY: Final = ROOT / "dist" / "trigd"
MAX_EXPOSURE: Final = 2.5  # systemd-analyze security's scale, 0 (best) to 10
BUILD_TIMEOUT: Final = 900  # seconds for `make binary deb` on a 2-core machine

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
DPKG_DEB = shutil.which("dpkg-deb")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)
needs_dpkg_deb = pytest.mark.skipif(DPKG_DEB is None, reason="dpkg-deb is not installed")
packaging_build = pytest.mark.skipif(
    os.environ.get("TEST_PACKAGING") != "1",
    reason="builds the PyInstaller executable and the .deb (about a minute); "
    "set TEST_PACKAGING=1 to run",
)


# --- the systemd unit ----------------------------------------------------------------------


def unit_directives(text: str) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


REQUIRED_SERVICE: Final = {
    "Type": "notify",
    "NotifyAccess": "all",
    "ExecStart": "/usr/bin/trigd serve --config /etc/trigd/trigd.toml",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "Restart": "on-failure",
    "DynamicUser": "yes",
    "StateDirectory": "trigd",
    "ConfigurationDirectory": "trigd",
    "UMask": "0077",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "NoNewPrivileges": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "ProcSubset": "pid",
    "ProtectProc": "invisible",
}


def test_unit_has_the_required_directives() -> None:
    unit = unit_directives(UNIT.read_text())
    service = unit["Service"]
    wrong = {
        key: service.get(key)
        for key, value in REQUIRED_SERVICE.items()
        if service.get(key) != [value]
    }
    assert wrong == {}
    assert service["SystemCallFilter"][0] == "@system-service"
    assert re.fullmatch(r"\d+(s|min)", service["WatchdogSec"][0])
    # The package enables nothing, but `systemctl enable` must know where to hook it.
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    # Webhooks may go anywhere: no IP allow list.
    assert "IPAddressDeny" not in service


def verifiable_unit(tmp_path: Path) -> Path:
    """The unit itself when /usr/bin/trigd is installed, else a copy naming a stand-in
    executable (verify checks that ExecStart exists; nothing else is changed)."""
    if os.access("/usr/bin/trigd", os.X_OK):
        return UNIT
    stand_in = tmp_path / "trigd"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    copy = tmp_path / "trigd.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/trigd", str(stand_in)))
    return copy


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(verifiable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify exits 0 even for unknown keys and bad values: every warning is a failure here.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_unit_security_exposure_is_at_most_2_5(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(verifiable_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in result.stderr and "unrecognized" in result.stderr:
        pytest.skip("this systemd-analyze cannot analyse a unit file offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


# --- the executable's entry point ----------------------------------------------------------


def load_entry() -> ModuleType:
    spec = importlib.util.spec_from_file_location("trigd_entry", PACKAGING / "trigd_entry.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("watchdog_pid", "adopted", "after"),
    [
        ("100", True, "200"),  # addressed to the bootloader, our parent: ours now
        ("200", False, "200"),  # already ours (no bootloader in between)
        ("300", False, "300"),  # someone else's: the Notifier will ignore it
        (None, False, None),  # no watchdog
    ],
)
def test_entry_adopts_a_watchdog_addressed_to_the_bootloader(
    watchdog_pid: str | None, adopted: bool, after: str | None
) -> None:
    env = {} if watchdog_pid is None else {"WATCHDOG_PID": watchdog_pid}
    assert load_entry().adopt_watchdog(env, pid=200, parent_pid=100) is adopted
    assert env.get("WATCHDOG_PID") == after


# --- the example and the .deb layout -------------------------------------------------------


def check(*paths: Path) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = check_command([str(p) for p in paths], out, err)
    return code, out.getvalue() + err.getvalue()


def test_example_automation_is_valid() -> None:
    code, output = check(EXAMPLE)
    assert code == 0, output
    assert "pump pressure burst" in output
    assert "pump heartbeat missing" in output


def build_deb(tmp_path: Path, binary: Path) -> Path:
    result = subprocess.run(
        [str(PACKAGING / "build-deb.sh"), str(binary), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def deb_field(deb: Path, field: str) -> str:
    assert DPKG_DEB is not None
    return subprocess.run(
        [DPKG_DEB, "--field", str(deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


@needs_dpkg_deb
def test_deb_layout_around_a_stand_in_executable(tmp_path: Path) -> None:
    assert DPKG_DEB is not None
    stand_in = tmp_path / "trigd"
    stand_in.write_text("#!/bin/sh\necho stand-in\n")
    stand_in.chmod(0o755)
    deb = build_deb(tmp_path, stand_in)
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.name == f"trigd_{__version__}_{arch}.deb"
    assert deb_field(deb, "Package") == "trigd"
    assert deb_field(deb, "Version") == __version__
    assert deb_field(deb, "Depends").startswith("libc6 (>= ")

    root = tmp_path / "root"
    subprocess.run([DPKG_DEB, "--extract", str(deb), str(root)], check=True)
    control = tmp_path / "control"
    subprocess.run([DPKG_DEB, "--control", str(deb), str(control)], check=True)
    assert (root / "usr/bin/trigd").read_bytes() == stand_in.read_bytes()
    assert os.access(root / "usr/bin/trigd", os.X_OK)
    assert (root / "lib/systemd/system/trigd.service").read_text() == UNIT.read_text()
    assert (root / "usr/share/doc/trigd/examples/example.yaml").read_text() == EXAMPLE.read_text()
    shipped = {p.name for p in (root / "usr/share/doc/trigd/docs").glob("*.md")}
    assert shipped == {p.name for p in (ROOT / "docs").glob("*.md")}  # the reference too
    examples = {p.name for p in (root / "usr/share/doc/trigd/docs/examples").iterdir()}
    assert examples == {p.name for p in (ROOT / "docs/examples").iterdir()}  # what it links
    assert (root / "etc/trigd/automations").is_dir()
    assert (control / "conffiles").read_text().split() == ["/etc/trigd/trigd.toml"]
    # Nothing is enabled or started by the package (a running daemon is only restarted).
    commands = [
        line
        for name in ("postinst", "prerm", "postrm")
        for line in (control / name).read_text().splitlines()
        if not line.lstrip().startswith("#")
    ]
    assert [c for c in commands if re.search(r"\b(enable|start|--now)\b", c)] == []
    assert any("systemctl try-restart trigd.service" in c for c in commands)

    config = (root / "etc/trigd/trigd.toml").read_text()
    assert 'automations = ["/etc/trigd/automations"]' in config.splitlines()
    # The packaged config is valid, and loads what is dropped into its automations directory.
    automations = root / "etc/trigd/automations"
    relocated = tmp_path / "trigd.toml"
    relocated.write_text(config.replace('"/etc/trigd/automations"', json.dumps(str(automations))))
    assert check(relocated)[0] == 0
    shutil.copy(root / "usr/share/doc/trigd/examples/example.yaml", automations / "pumps.yaml")
    code, output = check(relocated)
    assert code == 0, output
    assert "pump heartbeat missing" in output


# --- the real executable, end to end (slow) ------------------------------------------------


@pytest.fixture(scope="module")
def built() -> Path:
    """`make binary deb` once for the module; yields the .deb."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    result = subprocess.run(
        [make, "binary", "deb"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    debs = sorted((ROOT / "dist").glob(f"trigd_{__version__}_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


def daemon_env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


async def run_binary(*args: str, stdin: str = "") -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [str(BINARY), *args],
        stdin=stdin.encode(),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=daemon_env(),
    )


async def notifications_until(sock: trio.socket.SocketType, message: str) -> list[str]:
    """sd_notify datagrams received up to and including `message` (bound by fail_after)."""
    seen: list[str] = []
    while message not in seen:
        seen.append((await sock.recv(4096)).decode())
    return seen


@pytest.mark.slow
@packaging_build
@pytest.mark.timeout(BUILD_TIMEOUT + 120)
async def test_executable_serves_fires_a_webhook_and_stops_cleanly(
    built: Path, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify"
    pressure = json.dumps(
        {"event": "pump.pressure.high", "resource": {"prefect.resource.id": "pump.7"}}
    )
    with (
        trio.fail_after(90),
        trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM) as sock,
    ):
        await sock.bind(str(notify_path))
        async with trio.open_nursery() as nursery:
            receiver: Receiver = await nursery.start(run_receiver, answer(200))
            automations = write_automations(tmp_path, [burst_automation(receiver.url())])
            config = write_config(tmp_path, [automations])
            # As under systemd: the bootloader is the "main PID" the watchdog is addressed to.
            bootloader = ("sh", "-c", 'export WATCHDOG_PID=$$; exec "$0" "$@"', str(BINARY))
            async with running_daemon(
                config,
                env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "400000"},
                start_timeout=90,
                command=bootloader,
            ) as daemon:
                # READY=1 after the last task started, then watchdog pings from the child.
                started = await notifications_until(sock, "READY=1")
                assert started == ["READY=1"]
                pings = await notifications_until(sock, "WATCHDOG=1")
                assert pings == ["WATCHDOG=1"]
                emitted = await run_binary(
                    "emit", "--url", daemon.url, stdin="\n".join([pressure] * 3) + "\n"
                )
                assert emitted.returncode == 0, emitted.stderr
                assert b"3 acknowledged, 0 rejected" in emitted.stdout
                request = await receiver.next_request()
                assert json.loads(request.body) == {"text": "pump pressure burst: pump.7"}
                Webhook(SECRET).verify(request.body, request.headers)

                status = await run_binary("status", "--db", str(tmp_path / "trigd.db"))
                assert status.returncode == 0, status.stderr
                assert b"pump pressure burst" in status.stdout

                daemon.send(signal.SIGHUP)  # to the bootloader, which forwards it
                await daemon.wait_for_log("reloaded 1 automations")
                assert await daemon.stop(signal.SIGTERM) == 0
                assert "STOPPING=1" in await notifications_until(sock, "STOPPING=1")
                assert "trigd stopped" in daemon.log
            nursery.cancel_scope.cancel()


@pytest.mark.slow
@packaging_build
@pytest.mark.timeout(BUILD_TIMEOUT + 120)
def test_deb_installs_into_a_throwaway_root_and_purges(built: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    admin = root / "var/lib/dpkg"
    (admin / "info").mkdir(parents=True)
    (admin / "updates").mkdir()
    (admin / "status").touch()
    # Scripts run outside the root with DPKG_ROOT set; ours then leave systemd alone.
    dpkg = ["dpkg", f"--root={root}", "--force-script-chrootless", "--force-not-root"]
    dpkg += ["--force-depends", "--log=/dev/null"]

    subprocess.run([*dpkg, "--install", str(built)], check=True, capture_output=True, timeout=120)
    version = subprocess.run(
        [str(root / "usr/bin/trigd"), "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.strip() == f"trigd {__version__}"
    conffiles = subprocess.run(
        ["dpkg-query", f"--admindir={admin}", "--showformat=${Conffiles}", "--show", "trigd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "/etc/trigd/trigd.toml" in conffiles

    subprocess.run([*dpkg, "--purge", "trigd"], check=True, capture_output=True, timeout=120)
    assert not (root / "usr/bin/trigd").exists()
    assert not (root / "etc/trigd").exists()
