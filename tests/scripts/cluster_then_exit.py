"""Start daskray, compute, report the cluster's processes, then exit WITHOUT shutdown().

Used by tests/test_processes.py: interpreter exit alone (the atexit hook) must stop
the head and the workers and remove the session directory.

Prints one JSON line: {"driver", "head", "workers", "session_dir", "result"}.
"""

import json
import os
import sys

import psutil

import daskray


def inc(x):
    return x + 1


def main() -> None:
    daskray.init(num_workers=int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    cluster = daskray.api._runtime.cluster
    result = daskray.get({"a": 1, "b": (inc, "a")}, "b")
    head = psutil.Process(cluster.head.pid)
    info = {
        "driver": os.getpid(),
        "head": head.pid,
        "workers": sorted(p.pid for p in head.children()),
        "session_dir": cluster.session_dir,
        "result": result,
    }
    print(json.dumps(info), flush=True)
    # no daskray.shutdown(): interpreter exit must clean up


main()
