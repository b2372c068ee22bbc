"""Loading and checking params sections: the machinery every config dataclass shares."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A params section has an unknown key, a wrong type or an invalid value."""


def check(ok: bool, section: str, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{section}.{key}: {message}")


T = TypeVar("T")


def load_section(cls: type[T], values: dict[str, Any] | None, *, section: str) -> T:
    """Build ``cls`` from a params mapping, refusing unknown keys and wrong types.

    >>> from kdcache.config.cache import CacheConfig
    >>> load_section(CacheConfig, {"top_k": 16}, section="cache").top_k
    16

    ``values`` None means the section is missing from params.yaml: the defaults apply, and a warning
    says so (a typo in a section name would otherwise train with defaults silently).
    """
    if values is None:
        log.warning("params: no '%s' section — using the library defaults for all of it", section)
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" — did you mean '{section}.{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise ConfigError(f"unknown key '{section}.{key}'{hint}")
        kwargs[key] = _coerce(hints[key], value, f"{section}.{key}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Check ``value`` against a field's type hint; convert lists to tuples and dicts to dataclasses."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return load_section(hint, value, section=where)
    if origin is Literal:
        if value not in typing.get_args(hint):
            choices = "|".join(map(str, typing.get_args(hint)))
            raise ConfigError(f"{where}: must be one of {choices}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        errors = []
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} fits none of the allowed types ({'; '.join(errors)})")
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: must be null")
        return None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: must be {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def load_params(path: str | Path) -> dict[str, Any]:
    """Read ``params.yaml`` (a mapping of sections); a key given twice in one mapping is refused, naming
    both lines (YAML parsers keep the last silently). Merge keys (``<<: *train``) may be overridden."""
    import yaml

    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_strict_loader()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: not found — run from the repository root or pass --params") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
    except RecursionError as e:
        raise ConfigError(f"{path}: nested too deeply to be a params file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(data).__name__}")
    return data


def _strict_loader() -> type:
    """A ``yaml.SafeLoader`` that refuses a key repeated within one mapping."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key '{key}' appears twice in one mapping (lines {seen[key].start_mark.line + 1} and "
                        f"{key_node.start_mark.line + 1}); YAML would keep only the last — remove one",
                    )
                seen[key] = key_node
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config (tuples become lists), for manifests and logs."""
    return _jsonable(dataclasses.asdict(cfg))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
