"""The limits file (`kvtier gateway --limits FILE`), a TOML document:

    [limits]
    redis_down = "closed"          # or "open": what to do while Redis cannot be reached

    [classes.paid]                 # priority classes; none given: one class, "default"
    share = 0.8                    # its share of the gateway at saturation (0 < share <= 1)
    rank = 0                       # lower is served first; vLLM's `priority` field
    reserve = 1                    # admission slots lower classes leave idle for it (default 0)

    [tenants.acme]
    rpm = 600                      # requests per (sliding) minute
    tpm = 100000                   # tokens per minute: prompt + max_tokens, settled to usage
    class = "paid"                 # the highest class its requests may ask for

    [keys."sk-team-a"]             # an API key: its limits apply on top of its tenant's
    rpm = 60

Every field is optional; a tenant or key that is not listed has no limit of its own, and a
tenant without a class gets the lowest one (the highest rank).
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

DEFAULT_CLASS = "default"


class RedisDown(enum.Enum):
    """What a limiter does while its Redis cannot be reached."""

    OPEN = "open"  # admit (counted)
    CLOSED = "closed"  # refuse with 503 (counted)


@dataclass(frozen=True, slots=True)
class Quota:
    """One tenant's or key's limits; None is no limit."""

    rpm: int | None = None
    tpm: int | None = None
    class_name: str | None = None


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str
    share: float
    rank: int
    reserve: int = 0  # admission slots that lower-ranked classes leave idle for this one


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """The parsed limits file. `classes` is ordered by rank (first is served first)."""

    tenants: Mapping[str, Quota]
    keys: Mapping[str, Quota]
    classes: tuple[PriorityClass, ...] = (PriorityClass(DEFAULT_CLASS, 1.0, 0),)
    redis_down: RedisDown = RedisDown.CLOSED

    def priority_class(self, name: str) -> PriorityClass:
        for cls in self.classes:
            if cls.name == name:
                return cls
        raise KeyError(name)

    @property
    def lowest_class(self) -> PriorityClass:
        return self.classes[-1]


def load_limits(path: str | Path) -> LimitsConfig:
    """Read and check a limits file; ConfigError names the file, table and field at fault."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"limits file {path}: cannot read it ({exc})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"limits file {path}: not valid TOML ({exc})") from exc
    return parse_limits(data, str(path))


def parse_limits(data: Mapping[str, Any], source: str = "<limits>") -> LimitsConfig:
    """A LimitsConfig from a parsed TOML document (`source` names it in errors)."""
    unknown = set(data) - {"limits", "classes", "tenants", "keys"}
    if unknown:
        raise ConfigError(
            f"limits file {source}: unknown table(s) {sorted(unknown)}; "
            'expected [limits], [classes.NAME], [tenants.NAME], [keys."KEY"]'
        )
    classes = _classes(_table(data, "classes", source), source)
    names = {c.name for c in classes}
    tenants = {
        name: _quota(value, f"tenants.{name}", source, names)
        for name, value in _table(data, "tenants", source).items()
    }
    keys = {
        name: _quota(value, f'keys."{name}"', source, names)
        for name, value in _table(data, "keys", source).items()
    }
    return LimitsConfig(tenants, keys, classes, _redis_down(data, source))


def _table(data: Mapping[str, Any], name: str, source: str) -> Mapping[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"limits file {source}: [{name}] must be a table")
    return value


def _fields(value: Any, table: str, source: str, allowed: set[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"limits file {source}: [{table}] must be a table")
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(
            f"limits file {source}: [{table}] has unknown field(s) {sorted(unknown)}; "
            f"allowed: {sorted(allowed)}"
        )
    return value


def _positive_int(value: Any, where: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(
            f"limits file {source}: {where} must be a whole number >= 1, not {value!r}"
        )
    return value


def _quota(value: Any, table: str, source: str, classes: set[str]) -> Quota:
    fields = _fields(value, table, source, {"rpm", "tpm", "class"})
    rpm = fields.get("rpm")
    tpm = fields.get("tpm")
    class_name = fields.get("class")
    if class_name is not None and class_name not in classes:
        raise ConfigError(
            f"limits file {source}: [{table}] class {class_name!r} is not one of the classes "
            f"{sorted(classes)} (define it under [classes.NAME])"
        )
    return Quota(
        None if rpm is None else _positive_int(rpm, f"[{table}] rpm", source),
        None if tpm is None else _positive_int(tpm, f"[{table}] tpm", source),
        class_name,
    )


def _classes(table: Mapping[str, Any], source: str) -> tuple[PriorityClass, ...]:
    if not table:
        return (PriorityClass(DEFAULT_CLASS, 1.0, 0),)
    classes = []
    for order, (name, value) in enumerate(table.items()):
        fields = _fields(value, f"classes.{name}", source, {"share", "rank", "reserve"})
        share = fields.get("share", 1.0)
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigError(
                f"limits file {source}: [classes.{name}] share must be in (0, 1], not {share!r}"
            )
        rank = fields.get("rank", order)
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ConfigError(
                f"limits file {source}: [classes.{name}] rank must be a whole number >= 0, "
                f"not {rank!r}"
            )
        reserve = fields.get("reserve", 0)
        if isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0:
            raise ConfigError(
                f"limits file {source}: [classes.{name}] reserve must be a whole number of "
                f"admission slots >= 0, not {reserve!r}"
            )
        classes.append(PriorityClass(name, float(share), rank, reserve))
    return tuple(sorted(classes, key=lambda c: c.rank))


def _redis_down(data: Mapping[str, Any], source: str) -> RedisDown:
    fields = _fields(data.get("limits", {}), "limits", source, {"redis_down"})
    value = fields.get("redis_down", RedisDown.CLOSED.value)
    try:
        return RedisDown(value)
    except ValueError:
        raise ConfigError(
            f'limits file {source}: [limits] redis_down must be "open" or "closed", not {value!r}'
        ) from None
