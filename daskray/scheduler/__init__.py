"""The I/O-free scheduler core: events in (``events``), instructions out
(``instructions``), one state machine (``state``), its policy (``policy``)."""

from .state import InvalidTransition, SchedulerState

__all__ = ["SchedulerState", "InvalidTransition"]
