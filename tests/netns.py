"""Hosts for tests: Linux network namespaces joined by veth pairs to one bridge.

``Network(4)`` makes four "hosts" (network namespaces ``<prefix>-h1`` ...
``<prefix>-h4``) on one private /24, and a fifth namespace ``<prefix>-br`` that holds
the bridge: each host's ``eth0`` is one end of a veth pair whose other end is a port of
that bridge.  Nothing is made in the host's own network namespace, and no host has a
route off the subnet, so the tests' traffic stays between the namespaces' own
addresses.  The prefix carries this process's pid: runs at the same time never share
a name (their subnets may be equal, they cannot meet).

``Processes`` starts commands inside a host and stops them again, each in a process
group of its own so that whatever a command spawns goes with it.

Making namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and iproute2's ``ip``;
:class:`NamespaceError` says which command failed and what it printed, for the
caller's ``pytest.skip``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, NamedTuple, Sequence

#: how long one ``ip`` command may take
IP_TIMEOUT = 20.0

#: how long a stopped process gets between SIGTERM and SIGKILL
STOP_GRACE = 5.0


class NamespaceError(RuntimeError):
    """An ``ip`` command failed: namespaces cannot be made (or removed) here."""


def ip(*args: str) -> str:
    """Run ``ip ARGS``; its output, or :class:`NamespaceError` with its stderr."""
    command = ["ip", *args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=IP_TIMEOUT)
    except FileNotFoundError:
        raise NamespaceError("`ip` (iproute2) is not installed") from None
    except subprocess.TimeoutExpired:
        raise NamespaceError(f"`{' '.join(command)}` did not finish within {IP_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        raise NamespaceError(f"`{' '.join(command)}` failed (exit {done.returncode}): "
                             f"{done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def namespaces() -> list[str]:
    """The names ``ip netns list`` shows (any owner's)."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


class Network:
    """``hosts`` network namespaces on ``subnet``.0/24 (host ``i`` is ``subnet.i``),
    each joined by a veth pair to a bridge in a namespace of its own."""

    def __init__(self, hosts: int, subnet: str = "10.87.1", prefix: str | None = None) -> None:
        self.prefix = prefix or f"dkr{os.getpid()}"
        self.subnet = subnet
        self.hosts = [f"{self.prefix}-h{i}" for i in range(1, hosts + 1)]
        self.bridge_ns = f"{self.prefix}-br"
        self._made: list[str] = []

    def address(self, host: int) -> str:
        """The IPv4 address of host ``host`` (1-based)."""
        return f"{self.subnet}.{host}"

    def exec_argv(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside host ``host``'s namespace."""
        return ["ip", "netns", "exec", self.hosts[host - 1], *argv]

    def create(self) -> None:
        """Make the bridge and the hosts; on failure remove what was made and raise
        :class:`NamespaceError`."""
        try:
            self._add_namespace(self.bridge_ns)
            ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for number, name in enumerate(self.hosts, start=1):
                self._add_host(number, name)
        except BaseException:
            self.remove()
            raise

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)

    def _add_host(self, number: int, name: str) -> None:
        """Namespace ``name``: loopback up, ``eth0`` with the host's address, its veth
        peer ``p<number>`` a port of the bridge."""
        self._add_namespace(name)
        port = f"p{number}"
        ip("-n", self.bridge_ns, "link", "add", port, "type", "veth",
           "peer", "name", "eth0", "netns", name)
        ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
        ip("-n", self.bridge_ns, "link", "set", port, "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", f"{self.address(number)}/24", "dev", "eth0")
        ip("-n", name, "link", "set", "eth0", "up")

    def pids(self) -> dict[str, list[int]]:
        """The processes still running inside each namespace this made."""
        out = {}
        for name in self._made:
            try:
                found = [int(p) for p in ip("netns", "pids", name).split()]
            except NamespaceError:
                continue
            if found:
                out[name] = found
        return out

    def remove(self) -> list[str]:
        """Delete every namespace this made (their veths and the bridge go with
        them); what could not be deleted, as messages."""
        problems = []
        for name in reversed(self._made):
            try:
                ip("netns", "delete", name)
            except NamespaceError as exc:
                problems.append(str(exc))
        self._made.clear()
        return problems

    def leftovers(self) -> list[str]:
        """This network's namespaces that ``ip netns list`` still shows."""
        mine = {self.bridge_ns, *self.hosts}
        return [name for name in namespaces() if name in mine]


class Finished(NamedTuple):
    """How a command run to its end (or to its timeout) ended."""

    stdout: str
    returncode: int
    timed_out: bool


class Processes:
    """Commands started by a test, each in a process group (session) of its own."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(self, argv: Sequence[str], log: Path, env: dict | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start ``argv`` with stdout and stderr to ``log``."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                    start_new_session=True)
        self.started.append(proc)
        return proc

    def run(self, argv: Sequence[str], timeout: float, env: dict | None = None,
            cwd: Path | None = None, stderr: IO | None = None) -> Finished:
        """Run ``argv`` to its end, at most ``timeout`` seconds.  A command that
        overstays is stopped with its group; its output so far still counts."""
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=stderr,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True,
                                start_new_session=True)
        self.started.append(proc)
        try:
            out, _ = proc.communicate(timeout=timeout)
            return Finished(out, proc.returncode, timed_out=False)
        except subprocess.TimeoutExpired:
            _stop(proc)
            try:
                out, _ = proc.communicate(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:  # something outside the group holds its stdout
                out = ""
            return Finished(out, proc.returncode, timed_out=True)

    def stop_all(self) -> None:
        """Stop every group started, the last started first (clients before their
        servers): SIGTERM, SIGKILL if still there after ``STOP_GRACE``."""
        for proc in reversed(self.started):
            if proc.poll() is None:
                _stop(proc)

    def alive(self, grace: float = STOP_GRACE) -> list[str]:
        """The processes of the groups started that still run after ``grace``
        seconds (a process just killed takes a moment to go), as messages."""
        deadline = time.monotonic() + grace
        while True:
            found = self._members()
            if not found or time.monotonic() > deadline:
                return [f"pid {pid} ({_cmdline(pid)}) of group {group}" for pid, group in found]
            time.sleep(0.05)

    def _members(self) -> list[tuple[int, int]]:
        """(pid, group) of the live processes in the groups started."""
        groups = {proc.pid for proc in self.started}
        found = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            try:
                group = os.getpgid(pid)
            except (ProcessLookupError, PermissionError):
                continue
            if group in groups and not _is_zombie(pid):
                found.append((pid, group))
        return found


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s group: SIGTERM, then as :func:`_reap`."""
    _signal_group(proc, signal.SIGTERM)
    _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """Wait ``STOP_GRACE`` for ``proc`` to exit, then SIGKILL its group; reap it.
    (What outlives this, or its leader, is found by ``Processes.alive``.)"""
    try:
        proc.wait(timeout=STOP_GRACE)
        return
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
    try:
        proc.wait(timeout=STOP_GRACE)
    except subprocess.TimeoutExpired:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
