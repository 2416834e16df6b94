"""Entry point of a worker process: ``python -m daskray.runtime.start_worker``.

It picks the in-task session (a :class:`~daskray.runtime.session.Session` over the
worker) so that ``worker`` itself need not import the session layer above it.

The worker registers without importing dask or the public API (a cluster starts
in well under a second), then loads the public API in a background thread: a
task calling ``daskray.get`` or ``.remote()`` would otherwise pay that import
(about 0.3 s of CPU, dask's modules included) inside the first such task.
"""

import threading

from daskray.runtime.session import Session
from daskray.runtime.worker import main


def _load_public_api() -> None:
    try:
        import daskray.api  # noqa: F401
    except Exception:  # noqa: BLE001 - a task that needs it raises the error itself
        pass


def _preload_soon() -> None:
    threading.Thread(target=_load_public_api, name="daskray-preload", daemon=True).start()


main(Session, after_start=_preload_soon)
