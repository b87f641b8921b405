"""What to fuse: parse ``--layers``, choose each layer's width, validate against the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mlpfuse.errors import InputError

if TYPE_CHECKING:
    from mlpfuse.arch import MLPSite


def parse_ranges(parts, what: str, example: str) -> set[int]:
    """Integers from items like ``"4-11"`` and ``"3"``; an InputError naming ``what`` otherwise."""
    chosen: set[int] = set()
    for raw in parts:
        if isinstance(raw, bool) or not isinstance(raw, (int, str)):
            raise InputError(f"bad {what} value {raw!r}: use e.g. {example}")
        part = str(raw).strip()
        if not part:
            raise InputError(f"bad {what} value: an empty item (a stray comma?); use e.g. {example}")
        try:
            if "-" in part[1:]:
                start, end = (int(x) for x in part.split("-", 1))
                if end < start:
                    raise ValueError
                chosen.update(range(start, end + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise InputError(f"bad {what} value {part!r}: use e.g. {example}") from None
    return chosen


def parse_layers(spec: str | list | tuple | None, count: int) -> list[int]:
    """Layer indices from ``"4-11"``, ``"0,2,4"``, ``"0-2,5"``, ``"all"`` or a list of ints."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return list(range(count))
    parts = list(spec) if isinstance(spec, (list, tuple)) else str(spec).split(",")
    chosen = parse_ranges(parts, "--layers", "4-11, 0,2,4 or all")
    bad = sorted(i for i in chosen if not 0 <= i < count)
    if bad:
        raise InputError(f"layer(s) {bad} out of range: this model has {count} MLP layers (0-{count - 1})")
    return sorted(chosen)


def target_width(original: int, dim: int | None, ratio: float | None, where: str = "") -> int:
    """The fused width from ``dim`` or ``ratio`` (``round(ratio * original)``, never below 1); in [1, original]."""
    if (dim is None) == (ratio is None):
        raise InputError(f"give exactly one of --dim or --ratio{where}")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
        raise InputError(f"--dim must be an integer, got {dim!r}{where}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))):
        raise InputError(f"--ratio must be a number in (0, 1], got {ratio!r}{where}")
    if ratio is not None:
        if not 0 < ratio <= 1:
            raise InputError(f"--ratio must be in (0, 1], got {ratio}{where}")
        dim = max(1, round(original * ratio))
    if not 0 < dim <= original:
        raise InputError(
            f"--dim must be between 1 and the intermediate size {original}, got {dim}{where}"
        )
    return int(dim)


def check_multiple(multiple_of) -> None:
    """Refuse a ``--multiple-of`` that is not a positive integer (InputError)."""
    if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
        raise InputError(f"--multiple-of must be an integer >= 1, got {multiple_of!r}")


def round_width(width: int, multiple_of: int, original: int) -> int:
    """``width`` rounded down to a multiple of ``multiple_of`` (tensor-core and GGUF block friendly);
    when that is 0, the smallest multiple, and never above ``original``."""
    rounded = (width // multiple_of) * multiple_of
    return min(rounded if rounded > 0 else multiple_of, original)


@dataclass
class LayerPlan:
    site: MLPSite
    original_width: int
    width: int


def plan_layers(
    sites: list[MLPSite],
    widths_of: dict[int, int],
    layers,
    dim: int | None,
    ratio: float | None,
    overrides: dict | None = None,
    allow_full_width: bool = False,
    multiple_of: int = 1,
) -> list[LayerPlan]:
    """One LayerPlan per chosen site; per-layer ``overrides`` ({index: {dim|ratio}}) beat the defaults.

    Every width is then rounded by :func:`round_width` to a multiple of ``multiple_of``. ``--dim``
    equal to the intermediate size is refused (nothing would be compressed) unless
    ``allow_full_width`` (the exactness check in tests and ntk-check uses it).
    """
    check_multiple(multiple_of)
    chosen = parse_layers(layers, len(sites))
    overrides = _override_map(overrides)
    unknown = sorted(set(overrides) - set(chosen))
    if unknown:
        raise InputError(f"per-layer overrides name layer(s) {unknown} that are not being fused")
    plans = []
    for index in chosen:
        site = sites[index]
        original = widths_of[index]
        layer_dim, layer_ratio = dim, ratio
        if index in overrides:
            extra = set(overrides[index]) - {"dim", "ratio"}
            if extra:
                raise InputError(f"per-layer override for layer {index} has unknown key(s) {sorted(extra)}; use dim or ratio")
            layer_dim, layer_ratio = overrides[index].get("dim"), overrides[index].get("ratio")
        where = f" (layer {site.label})" if index in overrides or dim is not None else ""
        width = round_width(target_width(original, layer_dim, layer_ratio, where), multiple_of, original)
        if width == original and not allow_full_width:
            raise InputError(
                f"width {width} equals the intermediate size of layer {site.label}: nothing to compress; "
                f"choose a smaller --dim or --ratio"
            )
        plans.append(LayerPlan(site, original, width))
    return plans


def _override_map(overrides) -> dict[int, dict]:
    """Per-layer overrides ``{layer: {dim: k} | {ratio: r}}`` with integer layer keys; InputError otherwise."""
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise InputError(f"per_layer must be a mapping of layer: {{dim: k}} or {{ratio: r}}, got {overrides!r}")
    result = {}
    for key, value in overrides.items():
        try:
            if isinstance(key, bool) or isinstance(key, float):
                raise ValueError
            index = int(key)
        except (TypeError, ValueError):
            raise InputError(f"per_layer key {key!r} is not a layer number; use e.g. 5: {{dim: 256}}") from None
        if not isinstance(value, dict):
            raise InputError(f"per_layer value for layer {key} must be a mapping such as {{dim: 256}} or "
                             f"{{ratio: 0.5}}, got {value!r}")
        result[index] = value
    return result
