"""Registry of token mixers: ``register_mixer``, ``get_mixer``, ``list_mixers``."""

from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

from .base import Mixer

_MIXERS: dict[str, type[Mixer]] = {}

M = TypeVar("M", bound=type[Mixer])


def register_mixer(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`Mixer` subclass available as ``get_mixer(name, ...)``."""

    def wrap(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, Mixer)):
            raise TypeError(f"register_mixer({name!r}) must decorate a Mixer subclass, got {cls!r}")
        if name in _MIXERS and _MIXERS[name] is not cls:
            raise ValueError(f"a mixer named {name!r} is already registered ({_MIXERS[name].__qualname__})")
        _MIXERS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def list_mixers() -> list[str]:
    """Names of all registered mixers, sorted."""
    return sorted(_MIXERS)


def mixer_class(name: str) -> type[Mixer]:
    if not isinstance(name, str) or name not in _MIXERS:
        raise KeyError(f"unknown mixer {name!r}; registered mixers: {', '.join(list_mixers())}")
    return _MIXERS[name]


def mixer_kwargs(name: str) -> dict[str, Any]:
    """The constructor arguments of mixer ``name`` and their defaults (``inspect.Parameter.empty`` if required)."""
    sig = inspect.signature(mixer_class(name).__init__)
    return {p.name: p.default for p in list(sig.parameters.values())[1:] if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}


def get_mixer(name: str, **kwargs: Any) -> Mixer:
    """Build the mixer registered as ``name``; unknown arguments raise a TypeError naming them."""
    cls = mixer_class(name)
    allowed = mixer_kwargs(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise TypeError(f"mixer {name!r} got unknown argument(s) {unknown}; it accepts {sorted(allowed)}")
    return cls(**kwargs)


def parse_mixer_spec(spec: Any, where: str) -> tuple[str, dict[str, Any]]:
    """A mixer spec -- a registered name or ``{"type": name, **kwargs}`` -- as ``(name, kwargs)``.

    ``where`` names the spec in errors (``"layer_plan[2]"``, ``"hybrid: mixers[0]"``).
    """
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"{where} must be a mixer name or a dict with a 'type' key, got {spec!r}")
    name = spec["type"]
    if name not in list_mixers():
        raise ValueError(f"{where}: unknown mixer {name!r}; registered mixers: {', '.join(list_mixers())}")
    return name, {k: v for k, v in spec.items() if k != "type"}


def mixer_info(name: str) -> dict[str, Any]:
    """Short description of a registered mixer (for ``mnemo list`` and the docs)."""
    cls = mixer_class(name)
    args = {k: (None if v is inspectempty else v) for k, v in mixer_kwargs(name).items()}
    return {"name": name, "class": cls.__qualname__, "description": cls.description, "memory_kind": cls.memory_kind, "arguments": args}


inspectempty = inspect.Parameter.empty
