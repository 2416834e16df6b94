"""Entry point of a worker process: ``python -m daskray.runtime.start_worker``.

It picks the in-task session (a :class:`~daskray.runtime.session.Session` over the
worker) so that ``worker`` itself need not import the session layer above it.

The worker registers without importing dask or the public API (a cluster starts
in well under a second), then loads the public API the first time it waits 0.2 s
for work in vain: a task calling ``daskray.get`` or ``.remote()`` would otherwise pay
that import (about 0.3 s of CPU, dask's modules included) inside the first such
task.  It is loaded in the main thread, between tasks: an import in another
thread could race the imports a task's own unpickling makes.
"""

from daskray.runtime.session import Session
from daskray.runtime.worker import main


def _load_public_api() -> None:
    try:
        import daskray.api  # noqa: F401
    except Exception:  # noqa: BLE001 - a task that needs it raises the error itself
        pass


main(Session, after_start=_load_public_api)
