"""Start daskray, compute, report the cluster's processes, then sleep until killed.

Used by tests/test_processes.py, which SIGKILLs this driver (and, in one test, its
head and workers too) and checks what is left behind.

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
    time.sleep(600)


main()
