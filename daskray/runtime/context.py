"""Whether this process is a worker, and the session its tasks use.

Set once by the worker at start-up, which also installs that session in
:mod:`daskray.backend` (where a task's ``.remote()`` and ``get()`` find it);
read here by what asks where the calling code runs (``get_runtime_context``).
Kept apart from ``api`` so a worker starts without dask.
"""

from __future__ import annotations

from typing import Any

#: the Session of this worker process, or None in any other process
worker_session: Any = None

#: the method of every actor that says where its process takes calls straight
#: (see actors.host and runtime.session)
DIRECT = "__daskray_direct__"
#: in an actor's process: (address of its direct socket, its worker id), what a
#: call of ``DIRECT`` returns
direct_channel: tuple | None = None
