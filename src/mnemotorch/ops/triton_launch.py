"""Cached launches of ``@triton.jit`` kernels for eager hot paths, and the launch-time facts the kernel modules
share: the ptxas release, a device's compute capability and SM count (read once per device), and the
``[B, T, H, D]`` -> ``[B * T, H * D]`` view that their 2-D TMA descriptors take (:func:`tma_row_view`).

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run`` on every call: it binds and
specialises every argument (a native call per argument), builds the cache key and looks the compiled
kernel up before the launcher runs. On the H100 machine that is ~20 us of a ~30 us launch of a
kernel with ~35 arguments (``scripts/diag_host.py``), and an eager attention call pays it up to three
times on its critical path (forward, then the backward's first kernel while the GPU waits).

:class:`CachedLaunch` keeps, per key, the ``CompiledKernel`` that the first normal launch returned
and launches it directly the next time, as ``JITFunction.run``'s last two lines do. The key is
stricter than Triton's specialisation, so a hit can never pick a kernel compiled for other
arguments: every ``int``, ``float`` and ``bool`` argument by value, every tensor by dtype and
16-byte alignment (Triton specialises pointers on exactly that), host tensor descriptors by dtype,
alignment, shape, strides, block shape and padding, every constexpr by value, plus ``num_warps``,
``num_stages`` and the current device. Anything else (an unknown argument type, a missing constexpr,
the interpreter, launch hooks such as a profiler's) takes the normal path. ``MNEMO_LAUNCH_CACHE=0``
turns the cache off.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import re
from collections import OrderedDict

import torch

try:  # Triton >= 3.2 layout (3.6 on the GPU machine, 3.9 on the CPU ones)
    from triton import knobs as _knobs
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover - older Triton: the cache stays off
    _knobs = _driver = None

#: entries kept per kernel (least recently used dropped first); shapes and strides are in the key,
#: so a workload with many shapes keeps only the recent ones
MAX_ENTRIES = 64


def enabled() -> bool:
    """Whether launches may use the cache (``MNEMO_LAUNCH_CACHE``, default on; never in the interpreter)."""
    if _knobs is None or os.environ.get("MNEMO_LAUNCH_CACHE", "1") == "0":
        return False
    return not (os.environ.get("TRITON_INTERPRET", "0") == "1" or getattr(_knobs.runtime, "interpret", False))


def _hooks_set() -> bool:
    """A launch hook (a profiler) wants the metadata path of ``JITFunction.run``; take it then."""
    for name in ("launch_enter_hook", "launch_exit_hook"):
        hook = getattr(_knobs.runtime, name, None)
        if hook is None:
            continue
        calls = getattr(hook, "calls", None)  # Triton 3.9 keeps a HookChain that may be empty
        if calls is None or len(calls):
            return True
    return False


_Tensor = torch.Tensor


def arg_key(a):
    """The part of the cache key for one runtime argument, or ``NotImplemented`` if not cacheable.
    Ints come back as themselves (the commonest case, kept cheapest: a call site passes the same
    type at the same position, so an int never meets a float or a bool there)."""
    t = type(a)
    if t is int:
        return a
    if isinstance(a, _Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if t is float or t is bool or a is None:
        return (t, a)
    base = getattr(a, "base", None)
    if isinstance(base, _Tensor) and hasattr(a, "block_shape"):  # triton.tools.tensor_descriptor.TensorDescriptor
        return ("desc", base.dtype, base.data_ptr() % 16 == 0, tuple(a.shape), tuple(a.strides), tuple(a.block_shape),
                getattr(a, "padding", None), getattr(a, "round_f32_to_tf32", None))
    return NotImplemented


class CachedLaunch:
    """``CachedLaunch(kernel)[grid](*args, num_warps=..., num_stages=..., **constexprs)``: the same
    launch as ``kernel[grid](...)``, through the compiled kernel cached on the first call.

    Runtime arguments are positional, constexprs by keyword (as every call site here passes them).
    ``hits`` / ``misses`` count the two paths (tests)."""

    def __init__(self, kernel, max_entries: int = MAX_ENTRIES):
        self.kernel = kernel
        self.max_entries = max_entries
        self.entries: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    @staticmethod
    def _key(device, args, kwargs):
        parts = [arg_key(a) for a in args]
        if NotImplemented in parts:
            return None
        for value in kwargs.values():
            if not (value is None or type(value) in (int, bool, float, str)):
                return None
        parts.append(device)
        parts.append(tuple(kwargs.items()))
        return tuple(parts)

    def launch(self, grid, args: tuple, kwargs: dict):
        key = None
        if enabled() and not _hooks_set():
            device = _driver.active.get_current_device()
            key = self._key(device, args, kwargs)
        entry = None if key is None else self.entries.get(key)
        if entry is None:
            self.misses += 1
            compiled = self.kernel[grid](*args, **kwargs)
            if key is not None:
                self._remember(key, compiled, len(args), kwargs)
            return compiled
        self.hits += 1
        self.entries.move_to_end(key)
        compiled, names = entry
        full = list(args)
        full.extend([kwargs[n] for n in names])
        stream = _driver.active.get_current_stream(device)
        g = tuple(grid) + (1, 1)
        meta = compiled.launch_metadata(g[:3], stream, *full)
        compiled.run(g[0], g[1], g[2], stream, compiled.function, compiled.packed_metadata, meta,
                     _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook, *full)
        return compiled

    def _remember(self, key, compiled, n_args: int, kwargs: dict) -> None:
        """Cache ``compiled`` if it looks like a CompiledKernel and every parameter after the
        positional ones came by keyword (the launcher takes all parameters, in order)."""
        if not all(hasattr(compiled, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
            return
        names = list(getattr(self.kernel, "arg_names", ()))[n_args:]
        if any(n not in kwargs for n in names):
            return
        self.entries[key] = (compiled, names)
        if len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)


#: :func:`launcher`'s instances, by the id of their kernel (kept alive with it, so that an id is never reused)
_LAUNCHERS: dict = {}


def launcher(kernel) -> CachedLaunch:
    """The one :class:`CachedLaunch` of ``kernel``, made on first use. Call sites write ``launcher(_my_kernel)[grid](...)``
    with the module's global, so a test that swaps the global for a recording wrapper still sees every launch (the
    wrapper gets its own launcher; under the interpreter the cache is off and every launch goes through it)."""
    entry = _LAUNCHERS.get(id(kernel))
    if entry is None:
        entry = _LAUNCHERS[id(kernel)] = (kernel, CachedLaunch(kernel))
    return entry[1]


def launchers() -> list[CachedLaunch]:
    """Every :class:`CachedLaunch` :func:`launcher` has made (``.kernel``, ``.hits``, ``.misses``)."""
    return [c for _, c in _LAUNCHERS.values()]


@functools.lru_cache(maxsize=None)
def ptxas_release(capability: tuple[int, int]) -> tuple[int, int] | None:
    """``(major, minor)`` of the ptxas Triton compiles with for a GPU of this compute capability
    (``TRITON_PTXAS_PATH`` or Triton's bundled one), or None where it cannot be read, as Triton first read it in
    this process (Triton caches it, and its compile caches' keys name it). Benchmarks record it; launches that
    depend on the ptxas read it live (:func:`ptxas_for_build`)."""
    try:
        from triton.backends.nvidia import compiler as nv

        arch = capability[0] * 10 + capability[1]
        takes_arch = "arch" in inspect.signature(nv.get_ptxas_version).parameters  # (Triton 3.6 and 3.9 differ)
        found = re.search(r"release (\d+\.\d+)", nv.get_ptxas_version(arch) if takes_arch else nv.get_ptxas_version())
        return _release(found.group(1)) if found else None
    except Exception:  # another Triton layout, no ptxas
        return None


def _release(text: str) -> tuple[int, int] | None:
    found = re.search(r"(\d+)\.(\d+)", text or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def ptxas_for_build(capability: tuple[int, int], needs: tuple[int, int]) -> tuple[str | None, tuple[int, int] | None]:
    """The ptxas to build a kernel for a GPU of this compute capability with, when the kernel needs release ``needs``
    or newer: ``(path, release)``; path None = the one Triton takes now, because it is new enough or nothing newer is
    at hand (release None where it cannot be read).

    Read live, since the one Triton takes can change in a process: torch's inductor points ``TRITON_PTXAS_PATH`` at
    torch's own ptxas the first time it compiles a Triton kernel. Otherwise Triton 3.6 (torch 2.11) builds Hopper
    (sm_90) kernels with its ptxas of CUDA 12.8, and also ships ``ptxas-blackwell`` (12.9), which it takes for sm_100
    alone (Triton 3.9 takes it for sm_90 too). The 12.8 release builds the Titans walk at 32 hidden columns wrong and
    12.9 builds it right (docs/results/neural_memory.md, twentieth and twenty-eighth sessions), so on Hopper that one
    is offered (:func:`built_with_ptxas`) unless ``MNEMO_BUNDLED_PTXAS=0``."""
    arch = capability[0] * 10 + capability[1]
    try:
        used, newer = _bundled_ptxas_tools(arch)
    except Exception:  # another Triton layout, no ptxas
        return None, None
    mine, theirs = _release(used[1]), _release(newer[1])
    if (mine is not None and mine >= needs) or capability[0] != 9 or os.environ.get("MNEMO_BUNDLED_PTXAS") == "0":
        return None, mine
    if theirs is not None and theirs >= needs:
        ptxas_release(capability)  # (Triton caches the release it reads first, and names it in its cache keys: its own)
        return newer[0], theirs
    return None, mine


def _bundled_ptxas_tools(arch: int) -> tuple[tuple[str, str], tuple[str, str]]:
    """``(path, version)`` of the ptxas Triton builds ``arch`` with now, and of its bundled ``ptxas-blackwell``."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nv

    used, newer = nv.get_ptxas(arch), knobs.nvidia.ptxas_blackwell
    return (used.path, used.version), (newer.path, newer.version)


@contextlib.contextmanager
def built_with_ptxas(path: str | None):
    """Within: Triton builds kernels (compiled at their first launch) with the ptxas at ``path`` (a path
    :func:`ptxas_for_build` gave; ``triton.knobs.nvidia.ptxas``, restored on exit, ``TRITON_PTXAS_PATH`` with it); None
    changes nothing. Kernels already compiled are not rebuilt: a kernel built this way must carry the choice in its
    specialisation (a constexpr), so that Triton's caches keep the two builds apart (their cache key names the
    ptxas release Triton read first in the process)."""
    if path is None:
        yield
        return
    from triton import knobs

    with knobs.nvidia.scope():
        knobs.nvidia.ptxas = path
        yield


def _index(device) -> int:
    device = torch.device(device)
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def capability(device) -> tuple[int, int]:
    """The compute capability of a CUDA ``device``, read once per device (launch decisions ask on every call)."""
    return _capability(_index(device))


def sm_count(device) -> int:
    """The SM count of a CUDA ``device``, read once per device (persistent grids, program-count limits)."""
    return _sm_count(_index(device))


def tma_row_view(t: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """``t [B, T, H, D]`` seen as ``[B * T, H * D]`` (row ``b * T + t``, column ``h * D``) for a 2-D TMA descriptor:
    ``(shape, strides)``, or ``None`` when its strides or 16-byte alignment do not allow that view."""
    b, n, h, d = t.shape
    if t.stride(3) != 1 or t.stride(2) != d or (b > 1 and t.stride(0) != n * t.stride(1)):
        return None
    if t.data_ptr() % 16 or (t.stride(1) * t.element_size()) % 16:
        return None
    return [b * n, h * d], [t.stride(1), 1]


__all__ = ["CachedLaunch", "MAX_ENTRIES", "arg_key", "built_with_ptxas", "capability", "enabled", "launcher", "launchers", "ptxas_for_build",
           "ptxas_release", "sm_count", "tma_row_view"]
