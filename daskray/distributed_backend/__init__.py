"""daskray on an existing dask.distributed cluster: the backend past one machine.

``daskray.init(address="tcp://HOST:8786")`` (or ``client=distributed.Client(...)``)
installs a :class:`~daskray.distributed_backend.session.DistributedSession` behind
the backend seam (``daskray.backend``): remote calls become distributed tasks whose
keys are the ObjectRefs' keys, objects live in the dask workers' memory and move
as distributed moves them, and a task that calls ``get`` leaves its worker's thread
pool while it waits (``secede``/``rejoin``), so nested calls never deadlock.

Modules, one job each:

* ``joining``     -- connect to the cluster, check the workers can run daskray;
* ``futures``     -- this process's Futures: ObjectRef counts become the scheduler's wants;
* ``session``     -- Ray's core calls over a ``distributed.Client``;
* ``worker_side`` -- what runs on the dask workers: the call wrapper, the worker plugin.
"""
