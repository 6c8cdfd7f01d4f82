"""How fedmed shows numbers to people, and how it treats values that are not finite.

One vocabulary for every table, report and model card: a missing value is shown as
``MISSING``, and the epsilon of non-private training as ``NON_PRIVATE``.
"""

from __future__ import annotations

import math

MISSING = "-"
NON_PRIVATE = "inf (non-private)"


def finite_or_none(value: float | int | None) -> float | None:
    """``value`` as a float, or None where it is missing, infinite or NaN (JSON has no inf)."""
    if value is None or isinstance(value, bool):
        return None if value is None else float(value)
    value = float(value)
    return value if math.isfinite(value) else None


def format_number(value, digits: int = 6) -> str:
    """A number for people: whole numbers as they are, others to ``digits`` significant digits."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    value = finite_or_none(value)
    return MISSING if value is None else f"{value:.{digits}g}"


def format_epsilon(value, dp: bool = True, digits: int = 6) -> str:
    """A privacy cost: non-private training (or an infinite epsilon) says so in words."""
    if not dp or (isinstance(value, float) and math.isinf(value)):
        return NON_PRIVATE
    return format_number(value, digits)


TOO_NOISY = "too noisy to read"
UNREADABLE_ERROR = 0.1  # a score whose standard error is above this tells nothing a reader can use


def format_noisy(value, error, limit: float = UNREADABLE_ERROR, digits: int = 3) -> str:
    """A score computed from noisy counts, with its standard error: "0.871 ± 0.012", or,
    when the error passes ``limit``, words saying the score tells nothing yet."""
    value, error = finite_or_none(value), finite_or_none(error)
    if value is None:
        return MISSING
    if error is None:
        return f"{value:.{digits}f}"
    if error > limit:
        return f"{TOO_NOISY} (± {error:.2f})"
    return f"{value:.{digits}f} ± {error:.{digits}f}"
