"""What code running inside a worker process uses to reach the cluster.

Set once by the worker at start-up; ``daskray.api`` looks here before it looks
for a driver's runtime, so a task's ``.remote()`` and ``get()`` go through the
worker it runs on.  Kept apart from ``api`` so a worker starts without dask.
"""

from __future__ import annotations

from typing import Any

#: the Session of this worker process, or None in any other process
worker_session: Any = None
