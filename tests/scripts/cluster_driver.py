"""Start daskray, compute, report the cluster's processes, then exit or sleep.

    python cluster_driver.py NUM_WORKERS exit    # exit WITHOUT shutdown(): the atexit
                                                 # hook alone must stop everything
    python cluster_driver.py NUM_WORKERS sleep   # sleep until the test SIGKILLs it

Used by tests/test_processes.py, which then checks what is left behind.
Prints one JSON line: {"driver", "head", "workers", "session_dir", "result"}.
"""

import json
import os
import sys
import time

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
    if len(sys.argv) > 2 and sys.argv[2] == "sleep":
        time.sleep(600)
    # else no daskray.shutdown(): interpreter exit must clean up


main()
