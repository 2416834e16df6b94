"""daskray's settings, read from dask's config and checked in one way: a bad
value is a ``ValueError`` naming the key, what it must be, and how to set it.

A process reads its settings when it needs them; workers start with the driver's
dask config as it was at ``daskray.init()`` (see ``process.inherited_dask_config``).
"""

from __future__ import annotations

from typing import Any

_HOW = "set it with dask.config.set({{{key!r}: {example}}}) before daskray.init()"


def whole_number(key: str, default: int, minimum: int, example: int) -> int:
    """The int setting ``key`` (``default`` when unset), at least ``minimum``."""
    value = _get(key)
    if value is _UNSET:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be a whole number >= {minimum}, got {value!r}; "
                         + _HOW.format(key=key, example=example))
    return value


def duration(key: str, default: Any, minimum: float, example: str,
             why: str = "", never: bool = False) -> float | None:
    """The duration setting ``key`` in seconds (``default``, itself a duration,
    when unset): more than 0 and at least ``minimum`` seconds (``why`` says why);
    with ``never``, None (or "none", "false") means never and gives None."""
    import dask.utils

    value = _get(key)
    if value is _UNSET:
        value = default
    if never and (value is None or str(value).lower() in ("none", "false")):
        return None
    try:
        seconds = dask.utils.parse_timedelta(value, default="seconds")
    except (TypeError, ValueError, KeyError):
        seconds = None
    if seconds is None or seconds <= 0 or seconds < minimum:
        least = f"at least {minimum:g} s{f' ({why})' if why else ''}" if minimum \
            else "a positive duration"
        raise ValueError(f"{key} must be {least}, such as {example!r}, got {value!r}; "
                         + _HOW.format(key=key, example=repr(example)))
    return float(seconds)


_UNSET = object()


def _get(key: str) -> Any:
    import dask.config

    return dask.config.get(key, _UNSET)
