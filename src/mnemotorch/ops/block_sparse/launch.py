"""Launch-table overrides shared by the kernel modules (``swa_triton``, ``na2d_triton``).

Each module keeps a table of launch parameters per kernel and a dict of per-kernel overrides that
its ``launch_config`` applies over the table; :func:`launch_overrides` is the context manager behind
their ``override_launch`` (tests and the launch sweeps in ``scripts/diag_swa.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping


@contextlib.contextmanager
def launch_overrides(store: dict[str, dict], allowed: Mapping[str, tuple[str, ...]], kinds: Mapping[str, dict | None]) -> Iterator[None]:
    """Set ``store[kind] = cfg`` for each ``kind=cfg`` (``None`` or ``{}``: no override) for the
    duration of the ``with`` block, then restore what was there. ``allowed`` maps each kernel to its
    parameter names; an unknown kernel or parameter raises ``ValueError`` before anything changes."""
    for kind, cfg in kinds.items():
        if kind not in allowed:
            raise ValueError(f"override_launch: kernel must be one of {tuple(allowed)}, got {kind!r}")
        bad = set(cfg or {}) - set(allowed[kind])
        if bad:
            raise ValueError(f"override_launch: unknown {kind} parameters {sorted(bad)}; allowed {tuple(allowed[kind])}")
    saved = {k: store.get(k) for k in kinds}
    try:
        for kind, cfg in kinds.items():
            if cfg:
                store[kind] = dict(cfg)
            else:
                store.pop(kind, None)
        yield
    finally:
        for kind, cfg in saved.items():
            if cfg is None:
                store.pop(kind, None)
            else:
                store[kind] = cfg
