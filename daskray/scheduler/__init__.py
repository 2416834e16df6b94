"""The I/O-free scheduler core: events in (``events``), instructions out
(``instructions``), one state machine (``state``) whose concerns each have a
module (see its docstring), its policy (``policy``)."""

from .state import InvalidTransition, SchedulerState

__all__ = ["SchedulerState", "InvalidTransition"]
