"""``daskray.ml.tune``: Ray Tune's names in one place.

The search spaces (:func:`uniform`, :func:`loguniform`, :func:`choice`,
:func:`randint`, :func:`grid_search`), the schedulers, :class:`TuneConfig` and
:class:`ResultGrid` come from :mod:`daskray.ml.search`, which also runs the
search behind ``Trainer(config=TuneConfig(...))``; :class:`Tuner`, :func:`report`,
:func:`get_checkpoint` and :func:`with_parameters` come from
:mod:`daskray.ml.tuner`.  This module only gathers them, so the search and the
Tuner import each other's parts from below, never through here.

Objects pickled by earlier versions name this module (``daskray.ml.tune.ResultGrid``,
the search-space classes, ...): every class that lived here is importable here.
"""

from .checkpoints import Checkpoint, Result
from .search import (
    SEARCH_ALGS, ASHAScheduler, Domain, FIFOScheduler, ResultGrid, TuneConfig, build_model,
    check_space, check_stop, choice, generate_configs, grid_search, loguniform, randint,
    run_search, stop_reached, train_trial, trial_configs, uniform,
)
# the search-space classes lived here; parameter spaces pickled then name them here
from .search import _Choice, _Grid, _LogUniform, _RandInt, _Uniform  # noqa: F401
from .tuner import Tuner, get_checkpoint, report, with_parameters

__all__ = [
    "Domain", "uniform", "loguniform", "choice", "randint", "grid_search", "SEARCH_ALGS",
    "generate_configs", "ASHAScheduler", "FIFOScheduler", "TuneConfig", "stop_reached",
    "check_stop", "ResultGrid", "build_model", "check_space", "train_trial", "trial_configs",
    "run_search", "Checkpoint", "Result", "Tuner", "report", "get_checkpoint",
    "with_parameters",
]
