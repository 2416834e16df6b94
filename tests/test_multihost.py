"""daskray on a dask.distributed cluster of real hosts: four network namespaces.

The hosts are Linux network namespaces on one private /24, each joined by a veth pair
to a bridge (``tests/netns.py``):

  host1  ``dask scheduler``
  host2  ``dask worker --resources host2=1``
  host3  ``dask worker --resources host3=1``
  host4  the driver, ``tests/scripts/multihost_driver.py``: ``daskray.init(address=...)``

Each process listens on, and talks from, its own host's address only; no host has a
route off the subnet.  The workers run without a nanny (``--no-nanny``): one process per
host, so a start costs one interpreter instead of two, and a worker that dies fails the
test instead of being replaced behind its back.

The module fixture builds the hosts, starts the three dask processes, runs the driver
once (it prints one JSON line per part) and removes everything again, in a ``finally``,
before any test looks at the results: each test then checks one part.  Without root (or
without ``ip``, or where the kernel refuses) every test is skipped with the failing
command and what it printed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from netns import Finished, NamespaceError, Network, Processes

pytestmark = [pytest.mark.slow, pytest.mark.multihost, pytest.mark.timeout(240)]

DRIVER = Path(__file__).parent / "scripts" / "multihost_driver.py"
SCHEDULER_PORT = 8786

#: how long the driver may take for all its parts
DRIVER_TIMEOUT = 150.0

PARTS = ("cluster", "object", "array", "dataframe", "actor")


@dataclass
class Run:
    """What one run on the four hosts left: the driver's parts, the logs, leftovers."""

    network: Network
    parts: dict[str, dict] = field(default_factory=dict)
    driver: Finished | None = None
    logs: dict[str, Path] = field(default_factory=dict)
    leftovers: list[str] = field(default_factory=list)

    def part(self, name: str) -> dict:
        """The driver's line for ``name``; the test fails (with the logs) when the part
        ended in an error or never reported."""
        line = self.parts.get(name)
        if line is None:
            pytest.fail(f"the driver never reported part {name!r}: {self.driver_end()}\n"
                        f"{self.log_tails()}")
        if line["status"] == "skipped":
            pytest.skip(f"{name}: {line['reason']}")
        assert line["status"] == "done", f"part {name!r} failed:\n{line['error']}"
        return line

    def driver_end(self) -> str:
        """How the driver ended, in words."""
        if self.driver is None:
            return "it did not start"
        if self.driver.timed_out:
            return f"it did not finish within {DRIVER_TIMEOUT:.0f} s and was stopped"
        return f"it exited with code {self.driver.returncode}"

    def log_tails(self, lines: int = 30) -> str:
        out = []
        for name, path in self.logs.items():
            text = path.read_text(errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {name} ({path}), last {lines} lines:\n" + "\n".join(text[-lines:]))
        return "\n".join(out)


def child_env() -> dict:
    """The environment of every process: this one's (so the same Python finds daskray,
    through PYTHONPATH or the installed package), minus what would point daskray at
    another cluster."""
    env = dict(os.environ)
    env.pop("DASKRAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def dask_command(*args: str) -> list[str]:
    """``dask ARGS`` with this interpreter, so scheduler and workers run our Python."""
    return [sys.executable, "-m", "dask", *args]


def start_dask(network: Network, processes: Processes, workdir: Path, run: Run) -> str:
    """Start the scheduler on host1 and a worker on host2 and host3; the scheduler's
    address.  The driver waits for them to join."""
    env = child_env()
    scheduler_ip = network.address(1)
    address = f"tcp://{scheduler_ip}:{SCHEDULER_PORT}"
    run.logs["scheduler"] = workdir / "scheduler.log"
    processes.start(network.exec_argv(1, dask_command(
        "scheduler", "--host", scheduler_ip, "--port", str(SCHEDULER_PORT), "--no-dashboard")),
        run.logs["scheduler"], env=env, cwd=workdir)
    for host in (2, 3):
        name = f"host{host}"
        run.logs[name] = workdir / f"{name}.log"
        processes.start(network.exec_argv(host, dask_command(
            "worker", address, "--host", network.address(host), "--name", name,
            "--nthreads", "1", "--no-nanny", "--no-dashboard", "--resources", f"{name}=1",
            "--local-directory", str(workdir / name), "--death-timeout", "60")),
            run.logs[name], env=env, cwd=workdir)
    return address


def run_driver(network: Network, processes: Processes, address: str, workdir: Path,
               run: Run) -> None:
    """Run the driver on host4; its JSON lines into ``run.parts``."""
    run.logs["driver"] = workdir / "driver.log"
    with open(run.logs["driver"], "w") as stderr:
        run.driver = processes.run(
            network.exec_argv(4, [sys.executable, str(DRIVER), address]),
            timeout=DRIVER_TIMEOUT, env=child_env(), cwd=workdir, stderr=stderr)
    for line in run.driver.stdout.splitlines():
        if line.startswith("{"):
            parsed = json.loads(line)
            run.parts[parsed["part"]] = parsed


def clean_up(network: Network, processes: Processes) -> list[str]:
    """Stop every process started, delete the namespaces; what is still there after."""
    processes.stop_all()
    left = processes.alive()
    for name, pids in network.pids().items():  # only processes inside our namespaces
        left.append(f"processes {pids} still ran in namespace {name}; killed")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    left += network.remove()
    left += [f"namespace {name} still listed by `ip netns list`" for name in network.leftovers()]
    return left


@pytest.fixture(scope="module")
def hosts(tmp_path_factory) -> Run:
    """One run of the driver on four hosts, everything removed again afterwards."""
    network = Network(4)
    try:
        network.create()
    except NamespaceError as exc:
        pytest.skip(f"cannot make network namespaces here (needs root and iproute2): {exc}")
    workdir = tmp_path_factory.mktemp("multihost")
    processes = Processes()
    run = Run(network)
    try:
        address = start_dask(network, processes, workdir, run)
        run_driver(network, processes, address, workdir, run)
    finally:
        run.leftovers = clean_up(network, processes)
    return run


def test_driver_and_workers_are_on_their_own_hosts(hosts):
    cluster = hosts.part("cluster")
    net = hosts.network
    assert cluster["driver"] == net.address(4)
    workers = {node["NodeManagerAddress"] for node in cluster["nodes"]}
    assert workers == {net.address(2), net.address(3)}, cluster["nodes"]


def test_100mb_object_made_on_one_host_is_read_on_the_other(hosts):
    seen = hosts.part("object")
    net = hosts.network
    assert (seen["made_on"], seen["read_on"]) == (net.address(2), net.address(3))
    assert seen["nbytes"] == 100 * 2**20
    assert seen["sha256_read"] == seen["sha256_made"] == seen["sha256_expected"]


def test_dask_array_equals_sync(hosts):
    result = hosts.part("array")
    assert result["equal"], f"max |difference| {result['max_abs_difference']}"
    assert result["graph_ran_on"] in {hosts.network.address(2), hosts.network.address(3)}


def test_dataframe_equals_sync(hosts):
    result = hosts.part("dataframe")
    assert result["equal"], result["difference"]
    assert result["count"] == 200_000  # every row of the left side found its label


def test_actor_on_one_host_called_from_the_other(hosts):
    calls = hosts.part("actor")["calls"]
    net = hosts.network
    assert [c["total"] for c in calls] == [2, 5]
    assert {(c["actor_on"], c["caller_on"]) for c in calls} == {(net.address(2), net.address(3))}


def test_driver_shuts_down_and_exits(hosts):
    driver = hosts.driver
    assert driver is not None and not driver.timed_out and driver.returncode == 0, \
        f"{hosts.driver_end()}\n{hosts.log_tails()}"


def test_nothing_is_left_behind(hosts):
    assert hosts.leftovers == []
    assert hosts.network.leftovers() == []
