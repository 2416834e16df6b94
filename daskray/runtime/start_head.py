"""Entry point of the head process: ``python -m daskray.runtime.start_head``."""

from daskray.runtime.head import main

main()
