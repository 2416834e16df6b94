"""Entry point of a worker process: ``python -m daskray.runtime.start_worker``."""

from daskray.runtime.worker import main

main()
