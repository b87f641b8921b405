"""Checks of option and recipe values shared by every command: one-line InputErrors, before any work.

Numbers from the command line or a YAML recipe are checked for type and range here (a seed numpy and
torch accept, FAISS after ``kmeans.faiss_seed``; a finite positive learning rate; a positive epoch
count), so that a bad value never reaches a library that would fail with a traceback or, worse, run with it.
"""

from __future__ import annotations

import math

from mlpfuse.errors import InputError
from mlpfuse.option_fields import CALIBRATION

# Defaults of fuse's calibration flags, declared in option_fields.CALIBRATION: mlpfuse/compress/calibration.py and the
# command line (which must not import calibration.py: it pulls torch) both read them. calibration_limit None: 128
# sequences for decoders, 512 for encoders (calibration.DEFAULT_LIMIT / DEFAULT_ENCODER_LIMIT).
CALIBRATION_DEFAULTS = {name: value for name, value in CALIBRATION.defaults().items() if name != "calibration"}
SEED_LIMIT = 2**32  # numpy's legacy seeds are unsigned 32-bit; FAISS's signed ones get kmeans.faiss_seed


def check_seed(seed, flag: str = "--seed") -> int:
    """``seed`` as an int in [0, 2**32); InputError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise InputError(f"{flag} must be an integer from 0 to {SEED_LIMIT - 1}, got {seed!r}")
    return seed


def check_positive(value, flag: str, integer: bool = False, allow_zero: bool = False):
    """``value`` as a finite number > 0 (>= 0 with ``allow_zero``; an int with ``integer``); InputError otherwise."""
    kind = "an integer" if integer else "a number"
    bound = ">= 0" if allow_zero else "> 0"
    number_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, number_types) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{flag} must be {kind} {bound}, got {value!r}")
    return value


def check_optional_positive(value, flag: str, integer: bool = True):
    """None, or a value that passes :func:`check_positive`."""
    return None if value is None else check_positive(value, flag, integer=integer)


def check_types(data: dict, types: dict[str, tuple], where: str) -> None:
    """Refuse a recipe field whose YAML value is not of one of its allowed types.

    ``types`` maps a field to a tuple of ``str``, ``int``, ``float``, ``bool``, ``list``, ``dict``,
    ``type(None)`` (``float`` accepts ints; neither accepts ``true``/``false``). Fields without an
    entry are not checked. Raises InputError naming the field, its value and what it takes.
    """
    for key, value in data.items():
        allowed = types.get(key)
        if allowed is None or _is_one_of(value, allowed):
            continue
        names = {str: "text", int: "an integer", float: "a number", bool: "true or false", list: "a list",
                 dict: "a mapping", type(None): "empty"}
        wanted = " or ".join(dict.fromkeys(names[t] for t in allowed))
        hint = "; write numbers without quotes" if isinstance(value, str) and {int, float} & set(allowed) else ""
        raise InputError(f"{where}: field {key} must be {wanted}, got {value!r} ({_yaml_kind(value)}){hint}")


def _is_one_of(value, allowed: tuple) -> bool:
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and (int in allowed or float in allowed):
        return True
    return any(isinstance(value, t) for t in allowed if t not in (int, bool))


def _yaml_kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
