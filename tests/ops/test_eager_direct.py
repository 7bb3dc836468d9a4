"""``ops/eager.direct``: eager calls of a custom op run its implementation without the dispatcher, with the same
results, and everything that needs the op (tracing, fake tensors, autograd without a given backward) still gets it."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import Tensor

from mnemotorch.ops.eager import direct

CALLS: list[bool] = []  # per call of the implementation: whether the dispatcher called it


def _through_dispatcher() -> bool:
    return any(f.filename.replace("\\", "/").endswith("torch/_library/custom_ops.py") for f in inspect.stack()[2:12])


@torch.library.custom_op("mnemotorch_test::scale_add", mutates_args=())
def scale_add(x: Tensor, ys: list[Tensor], a: float) -> tuple[Tensor, Tensor]:
    CALLS.append(_through_dispatcher())
    return x * a + ys[0], ys[1] * 2


@scale_add.register_fake
def _(x, ys, a):
    return torch.empty_like(x), torch.empty_like(ys[1])


@torch.library.custom_op("mnemotorch_test::axpy", mutates_args=())
def axpy(x: Tensor, y: Tensor, a: float) -> tuple[Tensor, Tensor]:
    CALLS.append(_through_dispatcher())
    return x * a + y, y * y


@axpy.register_fake
def _(x, y, a):
    return torch.empty_like(x), torch.empty_like(y)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])
    ctx.a = inputs[2]


def _backward(ctx, gx, gy):
    (y,) = ctx.saved_tensors
    return gx * ctx.a, gx + 2 * y * gy, None


axpy.register_autograd(_backward, setup_context=_setup)
fast = direct(scale_add)
fast_axpy = direct(axpy, _setup, _backward)
fast_axpy_no_grad = direct(axpy)


def _args(grad: bool = False):
    g = torch.Generator().manual_seed(0)
    x, y0, y1 = (torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_(grad) for _ in range(3))
    return x, [y0, y1], 0.5


def test_eager_call_skips_the_dispatcher_and_matches_the_op() -> None:
    x, ys, a = _args()
    CALLS.clear()
    got = fast(x, ys, a)
    want = scale_add(x, ys, a)
    assert CALLS == [False, True]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_autograd_goes_through_the_given_backward_or_else_the_op() -> None:
    x, (y, _), a = _args(grad=True)
    CALLS.clear()
    out = fast_axpy(x, y, a)
    gd = torch.autograd.grad(out[0].sum() + out[1].square().sum(), (x, y))
    out = axpy(x, y, a)
    go = torch.autograd.grad(out[0].sum() + out[1].square().sum(), (x, y))
    assert CALLS == [False, True]
    for g, w in zip(gd, go):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    CALLS.clear()
    fast_axpy_no_grad(x, y, a)  # no backward given: a call that needs one keeps the op's
    x2, ys2, _ = _args(grad=True)
    fast(x2, ys2, a)  # a list argument: autograd.Function could not see its tensors
    assert CALLS == [True, True]
    with torch.no_grad():
        fast_axpy_no_grad(x, y, a)
    assert CALLS == [True, True, False]


def test_fake_tensors_tracing_and_the_switch_take_the_op(monkeypatch) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, ys, a = _args()
    CALLS.clear()
    with FakeTensorMode() as mode:
        fx, fys = mode.from_tensor(x), [mode.from_tensor(y) for y in ys]
        out = fast(fx, fys, a)
    assert CALLS == [] and out[0].shape == x.shape  # the fake implementation ran, not the real one

    compiled = torch.compile(lambda x, ys: fast(x, ys, a), backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, ys)[0], x * a + ys[0])
    assert CALLS and CALLS[-1] is True  # dynamo traced the op; its graph then called it

    monkeypatch.setenv("MNEMO_DIRECT_OPS", "0")
    CALLS.clear()
    fast(x, ys, a)
    assert CALLS == [True]


def test_a_device_kernel_registered_besides_the_default_keeps_the_op() -> None:
    @torch.library.custom_op("mnemotorch_test::twice", mutates_args=())
    def twice(x: Tensor) -> Tensor:
        return x * 2

    @twice.register_kernel("cpu")
    def _(x):
        return x * 3

    assert torch.equal(direct(twice)(torch.ones(2)), torch.full((2,), 3.0))


@pytest.mark.parametrize("bad", ["subclass"])
def test_tensor_subclasses_keep_the_op(bad) -> None:
    class Sub(torch.Tensor):
        pass

    x, ys, a = _args()
    CALLS.clear()
    fast(x.as_subclass(Sub), ys, a)
    assert CALLS == [True]
