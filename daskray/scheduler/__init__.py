"""The I/O-free scheduler core: events in, instructions out (see ``state``)."""

from .events import *  # noqa: F401,F403
from .instructions import *  # noqa: F401,F403
from .state import InvalidTransition, SchedulerState

__all__ = ["SchedulerState", "InvalidTransition"]
