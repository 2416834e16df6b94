"""The live dashboard of a local cluster (``daskray.init(include_dashboard=True)``).

Three parts, so that the page never costs the scheduler anything:

* :mod:`.snapshot` runs in the head: at most :data:`~.snapshot.INTERVAL` apart
  it publishes a snapshot (plain data) on a ZeroMQ PUB socket, without ever
  waiting (a slow or absent reader loses snapshots, the head does not block);
* :mod:`.model` (plain data) folds snapshots into what the page and the metrics
  show, in the dashboard's own process;
* :mod:`.server` is that process: a Bokeh server (the library dask's own
  dashboard is built with: its plots update over a websocket, and its JavaScript
  ships inside the Python package, so nothing is fetched from a CDN) with the page
  (:mod:`.page`) at ``/`` and Prometheus metrics (:mod:`.metrics`) at ``/metrics``.
  It measures the workers' CPU and memory itself (psutil), and reads the object
  store's use from the shared-memory directory, so neither is the head's work.
"""
