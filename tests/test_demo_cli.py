"""``nextproxy pki --owner``, ``nextproxy demo --keep-pki`` and the role-aware ``nextproxy healthcheck``.

Real files, real processes on loopback, each bounded in time. ``--owner`` hands files to another
user, which needs root (as here and in CI); without root the same code is run handing the files
to the caller's own uid and gid, which any user may do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nextproxy import cli
from nextproxy.demo.commands import demo_pki_folder
from nextproxy.demo.pki import DEMO_HOSTS

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 20.0
IMAGE_UID = IMAGE_GID = 10001
# Unusual loopback IPs, so that other test runs on this machine do not collide with ours.
QUIET_NET = f"127.{100 + os.getpid() % 100}.7"
HOST_USER = 65534  # "nobody": a host user that is neither root nor the image's user
ROOT_RUNS = os.geteuid() == 0


def _as_user(uid: int, gid: int, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell ``script`` as uid:gid with no supplementary groups (the test's Python may live
    where other users cannot reach it; /bin/sh, cat and rm are for everyone)."""
    return subprocess.run(
        ["/bin/sh", "-c", script], user=uid, group=gid, extra_groups=[], capture_output=True, text=True, timeout=TIMEOUT
    )


@pytest.fixture
def project() -> Iterator[Path]:
    """A world-traversable folder (pytest's tmp_path is private to root), removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="nextproxy-owner-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- nextproxy pki --owner


def test_pki_owner_hands_the_folder_to_the_host_user_and_the_keys_to_the_image_group(project: Path) -> None:
    uid, gid = (HOST_USER, IMAGE_GID) if ROOT_RUNS else (os.getuid(), os.getgid())
    os.chown(project, uid, gid)  # the host user's project folder, where ./certs lives
    folder = project / "certs"
    assert cli.main(["pki", str(folder), "--owner", f"{uid}:{gid}"]) == 0
    for path in (folder, *folder.iterdir()):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (uid, gid), path
        expected = 0o640 if path.suffix == ".key" else 0o644 if path.is_file() else None
        if expected is not None:
            assert info.st_mode & 0o777 == expected, path
    if not ROOT_RUNS:
        return
    # The host user reads the client key and deletes the whole folder...
    host = _as_user(HOST_USER, HOST_USER, f"cat {folder}/client.key && rm -r {folder}")
    assert host.returncode == 0 and "PRIVATE KEY" in host.stdout, host.stderr
    assert not folder.exists()
    # ...and the image's user (uid 10001, gid 10001) reads the edge key through its group.
    assert cli.main(["pki", str(folder), "--owner", f"{HOST_USER}:{IMAGE_GID}"]) == 0
    image = _as_user(IMAGE_UID, IMAGE_GID, f"cat {folder}/edge.key")
    assert image.returncode == 0 and "PRIVATE KEY" in image.stdout, image.stderr
    # Anyone else reads the certificates but not the keys.
    other = _as_user(HOST_USER + 1, HOST_USER + 1, f"cat {folder}/edge.pem && cat {folder}/edge.key")
    assert "CERTIFICATE" in other.stdout and "PRIVATE KEY" not in other.stdout
    assert other.returncode != 0 and "Permission denied" in other.stderr


def test_pki_owner_leaves_an_existing_pki_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pki", str(tmp_path)]) == 0
    before = {path.name: (path.stat().st_uid, path.stat().st_mode) for path in tmp_path.iterdir()}
    assert cli.main(["pki", str(tmp_path), "--owner", f"{HOST_USER}:{IMAGE_GID}"]) == 0
    assert "left unchanged" in capsys.readouterr().out
    assert {path.name: (path.stat().st_uid, path.stat().st_mode) for path in tmp_path.iterdir()} == before


@pytest.mark.parametrize("owner", ["10001", "nobody:nogroup", "1:-1", ":", "1:2:3"])
def test_pki_owner_must_be_numeric_uid_gid(owner: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["pki", str(tmp_path / "certs"), "--owner", owner]) == cli.EXIT_CONFIG
    assert capsys.readouterr().err.startswith("nextproxy: --owner: expected UID:GID")
    assert not (tmp_path / "certs").exists(), "nothing written before the arguments are known good"


# --------------------------------------------------------------------------- nextproxy demo --keep-pki


def test_demo_pki_folder_is_removed_even_when_the_demo_fails(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        with demo_pki_folder(None) as folder:
            (folder / "ca.key").write_text("secret")
            raise OSError("cannot listen")
    assert not folder.exists()
    kept = tmp_path / "kept"
    with demo_pki_folder(str(kept)) as folder:
        assert folder == kept
    # The caller's folder is its own: not created early, never removed.
    assert not kept.exists()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_demo(*extra: str) -> tuple[Path, str]:
    """Start the real demo, wait until it serves, stop it with SIGTERM; (its PKI folder, output)."""
    port, admin = _free_port(), _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "nextproxy", "demo", "--port", str(port), "--admin-port", str(admin), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        match = re.search(r"demo PKI \(throwaway CA, edge and client certificates\): (\S+) \((.+)\)", "".join(lines))
        assert match, lines
        folder = Path(match[1])
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                socket.create_connection((DEMO_HOSTS["sfs"], 8888), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not start listening"
                time.sleep(0.05)
        assert (folder / "ca.key").is_file() and (folder / "edge.pem").is_file()
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=TIMEOUT)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    return folder, "".join(lines) + output


def test_demo_removes_its_pki_when_it_stops() -> None:
    folder, output = _run_demo()
    assert "(removed on exit)" in output
    assert folder.name.startswith("nextproxy-demo-")
    assert not folder.exists(), "the throwaway CA key must not outlive the demo"


def test_demo_keep_pki_keeps_it_in_the_named_folder(tmp_path: Path) -> None:
    kept = tmp_path / "demo-pki"
    folder, output = _run_demo("--keep-pki", str(kept))
    assert folder == kept and "(kept)" in output
    assert {path.name for path in kept.iterdir()} == {f"{n}.{e}" for n in ("ca", "edge", "upstream", "client") for e in ("pem", "key")}
    shutil.rmtree(kept)


# --------------------------------------------------------------------------- nextproxy healthcheck, by role


def _cmdline(tmp_path: Path, *argv: str) -> Path:
    path = tmp_path / "cmdline"
    path.write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    return path


def test_healthcheck_probes_the_ports_of_running_standins() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "nextproxy", "standins", "--service", "sfs", "--host", f"{QUIET_NET}.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    try:
        # Wait until they listen: before that (and briefly during exec) the command line may not
        # be theirs yet, which a container's healthcheck never sees.
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert process.poll() is None, process.communicate()[0].decode()
            try:
                socket.create_connection((f"{QUIET_NET}.1", 8888), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the stand-ins never listened"
                time.sleep(0.05)
        # Their own command line, as /proc/1/cmdline shows it in their container.
        assert cli.healthcheck(None, Path(f"/proc/{process.pid}/cmdline")) == 0
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=TIMEOUT)
    assert process.returncode == 0


def test_healthcheck_reads_the_standins_role_through_an_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # docker run --init: PID 1 is docker-init (podman: catatonit) and carries the command after "--".
    # Nothing listens there, so the check fails and says where it looked.
    host = f"{QUIET_NET}.2"
    cmdline = _cmdline(tmp_path, "/sbin/docker-init", "--", "nextproxy", "standins", "--service", "sfs", "--host", host)
    assert cli.healthcheck(None, cmdline) == 1
    assert f"nextproxy healthcheck: standins sfs-sigmai on {host}:8888: " in capsys.readouterr().err


def test_healthcheck_of_the_proxy_ignores_other_commands(
    tmp_path: Path, pki_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    admin = _free_port()
    monkeypatch.setenv("NEXTPROXY_ADMIN_LISTEN", f"127.0.0.1:{admin}")
    monkeypatch.setenv("NEXTPROXY_TLS_CERTIFICATE_FILE", str(pki_files["edge.pem"]))
    monkeypatch.setenv("NEXTPROXY_TLS_KEY_FILE", str(pki_files["edge.key"]))
    not_standins = (
        ("/opt/venv/bin/python", "/opt/venv/bin/nextproxy", "run"),
        ("/run/podman-init", "--", "nextproxy"),
        ("/usr/local/bin/standins",),
        ("sh", "-c", "nextproxy standins"),
    )
    for argv in not_standins:
        # The proxy's /readyz is asked (nothing answers on this port), never the stand-ins' ports.
        assert cli.healthcheck(None, _cmdline(tmp_path, *argv)) == 1
        assert capsys.readouterr().err.startswith(f"nextproxy healthcheck: 127.0.0.1:{admin}: "), argv
    # No /proc/1/cmdline at all (not Linux, or hidden): the proxy's check.
    assert cli.healthcheck(None, tmp_path / "missing") == 1
    assert f"127.0.0.1:{admin}" in capsys.readouterr().err
