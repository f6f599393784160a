"""The checks of the options every monitor and RunSummary are built with: one rule and one message for all.

A value of the wrong type (``2.5`` or ``True`` for an integer, ``"high"`` for a number, ``1`` for a flag) raises
``TypeError``; a value of the right type that the option does not accept (out of range, not one of the choices)
raises ``ValueError``. Every message names the option in backticks, says what it accepts and echoes the value::

    `bins` must be an integer in 1..512, got 2.5

Each check returns the value (an ``int`` for an integer, a ``float`` for a number) so that ``__init__`` can store
what it checked. This module imports nothing from the package (monitors, the base class and RunSummary use it).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, Literal, Optional, TypeVar, overload

_T = TypeVar("_T")


def _fail(error: type[Exception], name: str, accepts: str, value: Any, none_ok: bool) -> Exception:
    return error(f"`{name}` must be {'None or ' if none_ok else ''}{accepts}, got {value!r}")


def _range(kind: str, above: Optional[float], low: Optional[float], high: Optional[float]) -> str:
    """``"an integer in 1..512"``, ``"a number > 0"``, ``"a number > 0 and <= 1"``, ``"an integer"``."""
    if low is not None and high is not None:
        return f"{kind} in {low}..{high}"
    bounds = [f"> {above}"] if above is not None else []
    bounds += [f">= {low}"] if low is not None else []
    bounds += [f"<= {high}"] if high is not None else []
    return " ".join([kind, " and ".join(bounds)]) if bounds else kind


def _in_range(value: Any, above: Optional[float], low: Optional[float], high: Optional[float]) -> bool:
    # written so that NaN fails every bound
    return ((above is None or value > above) and (low is None or value >= low)
            and (high is None or value <= high))


def _checked(name: str, value: Any, kind: str, kind_type: type, above: Optional[float], low: Optional[float],
             high: Optional[float], none_ok: bool) -> Any:
    """``value`` when it is a ``kind_type`` (never a bool: ``True`` is no number of anything) within the bounds."""
    accepts = _range(kind, above, low, high)
    if isinstance(value, bool) or not isinstance(value, kind_type):
        raise _fail(TypeError, name, accepts, value, none_ok)
    if not _in_range(value, above, low, high):
        raise _fail(ValueError, name, accepts, value, none_ok)
    return value


@overload
def check_int(name: str, value: Any, *, low: Optional[int] = ..., high: Optional[int] = ...,
              none_ok: Literal[False] = ...) -> int: ...
@overload
def check_int(name: str, value: Any, *, low: Optional[int] = ..., high: Optional[int] = ...,
              none_ok: bool) -> Optional[int]: ...
def check_int(name: str, value: Any, *, low: Optional[int] = None, high: Optional[int] = None,
              none_ok: bool = False) -> Optional[int]:
    """``value`` as an ``int`` (``None`` when ``none_ok``): an integer (not a bool) in ``low..high``.

    Raises:
        TypeError: not an integer (``2.5``, ``True``, ``"3"``).
        ValueError: an integer out of range.
    """
    if value is None and none_ok:
        return None
    return int(_checked(name, value, "an integer", numbers.Integral, None, low, high, none_ok))


@overload
def check_count(name: str, value: Any, *, none_ok: Literal[False] = ...) -> int: ...
@overload
def check_count(name: str, value: Any, *, none_ok: bool) -> Optional[int]: ...
def check_count(name: str, value: Any, *, none_ok: bool = False) -> Optional[int]:
    """A count: an integer >= 0 (:func:`check_int`)."""
    return check_int(name, value, low=0, none_ok=none_ok)


@overload
def check_number(name: str, value: Any, *, above: Optional[float] = ..., low: Optional[float] = ...,
                 high: Optional[float] = ..., none_ok: Literal[False] = ...) -> float: ...
@overload
def check_number(name: str, value: Any, *, above: Optional[float] = ..., low: Optional[float] = ...,
                 high: Optional[float] = ..., none_ok: bool) -> Optional[float]: ...
def check_number(name: str, value: Any, *, above: Optional[float] = None, low: Optional[float] = None,
                 high: Optional[float] = None, none_ok: bool = False) -> Optional[float]:
    """``value`` as a ``float`` (``None`` when ``none_ok``): a real number (an int or a float, not a bool) that is
    ``> above``, ``>= low`` and ``<= high`` (each bound only when given; NaN fails any bound).

    Raises:
        TypeError: not a real number (``"high"``, ``True``, a tensor).
        ValueError: a number out of range.
    """
    if value is None and none_ok:
        return None
    return float(_checked(name, value, "a number", numbers.Real, above, low, high, none_ok))


@overload
def check_bool(name: str, value: Any, *, none_ok: Literal[False] = ...) -> bool: ...
@overload
def check_bool(name: str, value: Any, *, none_ok: bool) -> Optional[bool]: ...
def check_bool(name: str, value: Any, *, none_ok: bool = False) -> Optional[bool]:
    """``value``, a flag: ``True`` or ``False`` (``None`` too when ``none_ok``).

    Raises:
        TypeError: anything else (``1``, ``"yes"``).
    """
    if value is None and none_ok:
        return None
    if not isinstance(value, bool):
        raise _fail(TypeError, name, "True or False", value, none_ok)
    return value


def check_choice(name: str, value: Any, choices: Sequence[_T]) -> _T:
    """``value``, one of ``choices``.

    Raises:
        ValueError: anything else (of any type: a choice is a value, whatever its type).
    """
    for choice in choices:
        if isinstance(value, type(choice)) and isinstance(value, bool) == isinstance(choice, bool) and value == choice:
            return choice
    raise _fail(ValueError, name, f"one of {tuple(choices)!r}", value, False)
