"""Token counts written the way people write them: ``20B``, ``1.5M``, ``64K``, ``1e6``.

The one parser and formatter of such counts. ``anneal.train.schedule`` re-exports both (its
``parse_tokens`` raises ``ScheduleError`` instead of :class:`MixtureError`); this module sits
in ``mixtures`` so that the data package needs nothing from ``anneal``.

Suffixes are decimal and case-insensitive: ``K`` (1e3), ``M`` (1e6), ``B``/``G`` (1e9),
``T`` (1e12).
"""
from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import Any

from .errors import MixtureError

__all__ = ["format_tokens", "parse_tokens"]

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}


def parse_tokens(value: Any, what: str = "token count") -> int:
    """Turn ``20_000``, ``1e6``, ``"20B"``, ``"1.5M"``, ``"64K"``, ``"1T"`` into an int.

    Suffixes are decimal (``1K`` = 1000) and case-insensitive; underscores and surrounding
    spaces are ignored. The result must be a whole number of tokens (``"1.5K"`` is fine,
    ``"1.0005K"`` is not). Signs are kept: range checks belong to the caller, who can name
    the field. Raises :class:`MixtureError` naming ``what`` on anything else.
    """
    if isinstance(value, bool):  # bool is an int subclass; True tokens is surely a mistake
        raise MixtureError(f"{what}: expected a token count like 20B, 512M or 1000000, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise MixtureError(
                f"{what}: {value!r} is not a whole number of tokens; give an integer or a string like '1.5M'"
            )
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "").replace(",", "")
        scale = 1
        if text and text[-1].upper() in _SUFFIXES:
            scale = _SUFFIXES[text[-1].upper()]
            text = text[:-1].strip()
        try:
            number = Decimal(text) * scale
        except InvalidOperation:
            number = None
        if number is None or not number.is_finite():
            raise MixtureError(
                f"{what}: cannot read {value!r} as a token count; use an integer or a number with "
                f"a suffix K, M, B or T (e.g. '20B', '1.5M', '64K')"
            )
        if number != number.to_integral_value():
            raise MixtureError(f"{what}: {value!r} is not a whole number of tokens ({number})")
        return int(number)
    raise MixtureError(
        f"{what}: expected a token count (int or string like '20B'), got {type(value).__name__} {value!r}"
    )


def format_tokens(n: int | float) -> str:
    """Short human form of a token count: 20_000_000_000 -> '20B', 1_500_000 -> '1.5M'."""
    n = float(n)
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{suffix}"
    return f"{n:.4g}"
