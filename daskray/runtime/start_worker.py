"""Entry point of a worker process: ``python -m daskray.runtime.start_worker``.

It picks the in-task session (a :class:`~daskray.runtime.session.Session` over the
worker) so that ``worker`` itself need not import the session layer above it.
"""

from daskray.runtime.session import Session
from daskray.runtime.worker import main

main(Session)
