"""The compiled linearised Adam replay (kernels/cpu/csrc/adam_replay.c) against a slow, obvious float64 reference."""

from __future__ import annotations

import warnings

import pytest
import torch

from lpl.utils.errors import LplError

try:
    from lpl.kernels import cpu
    from lpl.kernels.cpu import _build
except ImportError:  # running from a source checkout without the package installed
    from kernels import cpu
    from kernels.cpu import _build

BETAS = (0.9, 0.999)
# eps well above float32 rounding of the gradients: Adam's update g / (|g| + eps) is then smooth, so float32 and
# float64 agree to rounding (with eps = 1e-8 a gradient within 1e-7 of zero turns rounding into a visible change)
EPS = 1e-3


def make_data(d: int, k: int, steps: int, batches: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    vectors = torch.linalg.qr(randn(steps, d, max(k, 1)))[0].transpose(1, 2)[:, :k].contiguous()
    return dict(
        pool_grads=randn(steps + 1, batches, d, scale=1e-2), hessian_vectors=vectors,
        hessian_values=randn(steps, k).abs() * 5, reference_updates=randn(steps, d, scale=0.5),
        val_grads=randn(steps + 1, d, scale=1e-2), lr=torch.linspace(0.02, 0.01, steps, dtype=torch.float64),
        theta=randn(steps, d),
    )


def reference(data: dict, order: list[int], weight_decay, decoupled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on g_s = pool[s, b_s] + V_s^T diag(lambda_s) V_s Delta_s, one order, plain float64 formulas."""
    d = data["pool_grads"].shape[-1]
    delta, m, v = (torch.zeros(d, dtype=torch.float64) for _ in range(3))
    dots = []
    for s, b in enumerate(order):
        dots.append(delta @ data["val_grads"][s])
        vectors, lr = data["hessian_vectors"][s], float(data["lr"][s])
        g = data["pool_grads"][s, b] + vectors.T @ (data["hessian_values"][s] * (vectors @ delta))
        if not decoupled:  # Adam: weight_decay * (theta_s + Delta_s) joins the gradient
            g = g + weight_decay * (data["theta"][s] + delta)
        else:  # AdamW: shrink first
            delta = delta * (1 - lr * weight_decay)
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        m_hat, v_hat = m / (1 - BETAS[0] ** (s + 1)), v / (1 - BETAS[1] ** (s + 1))
        delta = delta - lr * m_hat / (v_hat.sqrt() + EPS) + lr * data["reference_updates"][s]
    dots.append(delta @ data["val_grads"][len(order)])
    return delta, torch.stack(dots)


def run_kernel(data: dict, orders: torch.Tensor, weight_decay, decoupled: bool):
    f32 = {name: value.float().contiguous() for name, value in data.items()}
    decay = weight_decay.float() if isinstance(weight_decay, torch.Tensor) else weight_decay
    coupled = None if decoupled else (weight_decay * data["theta"]).float().contiguous()
    return cpu.adam_replay_cpu(
        f32["pool_grads"], f32["hessian_vectors"], f32["hessian_values"], f32["reference_updates"],
        f32["val_grads"], f32["lr"], orders, betas=BETAS, eps=EPS, weight_decay=decay, decoupled=decoupled,
        coupled_decay=coupled,
    )


pytestmark = pytest.mark.skipif(not cpu.adam_replay_available(), reason="no C compiler: the kernel cannot be built")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("decay", ["none", "adamw", "adam", "adamw_per_coordinate", "adam_per_coordinate"])
@pytest.mark.parametrize(
    "d,k,n,steps,length,batches",
    [
        (5, 0, 1, 3, 3, 2),  # one order, no curvature, a dimension smaller than a vector
        (37, 1, 3, 4, 4, 3),  # fewer orders than a group of four
        (1000, 3, 4, 6, 6, 5),  # one full group, an odd rank
        (2500, 5, 9, 7, 5, 4),  # several tiles per thread, groups plus a remainder, orders shorter than the run
        (3001, 16, 6, 5, 5, 3),  # rank 16, d not a multiple of the vector width
    ],
)
def test_matches_float64_reference(d, k, n, steps, length, batches, decay, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    data = make_data(d, k, steps, batches)
    generator = torch.Generator().manual_seed(1)
    orders = torch.randint(0, batches, (n, length), generator=generator)  # repeats and omissions
    decoupled = not decay.startswith("adam_") and decay != "adam"
    weight_decay = {"none": 0.0, "adamw": 0.1, "adam": 0.1}.get(decay)
    if weight_decay is None:  # two "param groups": decay on the first half of the coordinates only
        weight_decay = torch.zeros(d, dtype=torch.float64)
        weight_decay[: d // 2] = 0.3
    delta, dots = run_kernel(data, orders, weight_decay, decoupled)
    assert delta.shape == (n, d) and dots.shape == (n, length + 1)
    for i, order in enumerate(orders.tolist()):
        want_delta, want_dots = reference(data, order, weight_decay, decoupled)
        assert want_delta.abs().max() > 1e-3  # the orders really move
        torch.testing.assert_close(delta[i].double(), want_delta, rtol=1e-4, atol=2e-6)
        torch.testing.assert_close(dots[i], want_dots, rtol=1e-4, atol=2e-6)


def test_reference_matches_torch_adamw():
    """The reference above is Adam as torch runs it (AdamW on Delta, plus the reference update after each step)."""
    data = make_data(50, 2, 4, 3)
    delta = torch.zeros(50, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.AdamW([delta], lr=1.0, betas=BETAS, eps=EPS, weight_decay=0.1)
    order = [2, 0, 0, 1]
    for s, b in enumerate(order):
        for group in optimizer.param_groups:
            group["lr"] = float(data["lr"][s])
        vectors = data["hessian_vectors"][s]
        with torch.no_grad():
            delta.grad = data["pool_grads"][s, b] + vectors.T @ (data["hessian_values"][s] * (vectors @ delta))
        optimizer.step()
        with torch.no_grad():
            delta += data["lr"][s] * data["reference_updates"][s]
    torch.testing.assert_close(delta.detach(), reference(data, order, 0.1, True)[0], rtol=1e-12, atol=1e-12)


def test_empty_orders_and_zero_steps():
    data = make_data(40, 2, 3, 2)
    delta, dots = run_kernel(data, torch.zeros(0, 3, dtype=torch.int64), 0.0, True)
    assert delta.shape == (0, 40) and dots.shape == (0, 4)
    delta, dots = run_kernel(data, torch.zeros(2, 0, dtype=torch.int64), 0.0, True)
    assert not delta.any() and dots.shape == (2, 1) and not dots.any()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "pool_grads": a["pool_grads"].double()}, "pool_grads must be a contiguous float32"),
        (lambda a: {**a, "hessian_vectors": a["hessian_vectors"].transpose(1, 2)}, "contiguous"),
        (lambda a: {**a, "reference_updates": a["reference_updates"][:, :-1].contiguous()}, "reference_updates must"),
        (lambda a: {**a, "hessian_values": a["hessian_values"][:-1].contiguous()}, "hessian_values must have shape"),
        (lambda a: {**a, "orders": a["orders"] + 10}, "batch ids outside 0..2"),
        (lambda a: {**a, "orders": a["orders"] - 10}, "batch ids outside"),
        (lambda a: {**a, "orders": torch.zeros(1, 9, dtype=torch.int64)}, "orders of 9 steps"),
        (lambda a: {**a, "orders": a["orders"].int()}, "int64"),
        (lambda a: {**a, "weight_decay": torch.zeros(7)}, "weight_decay must have shape"),
    ],
)
def test_bad_input_is_refused(change, message):
    data = {name: value.float().contiguous() for name, value in make_data(40, 2, 4, 3).items()}
    args = {**{name: data[name] for name in ("pool_grads", "hessian_vectors", "hessian_values", "reference_updates",
                                             "val_grads", "lr")},
            "orders": torch.tensor([[0, 1, 2, 1]]), "weight_decay": 0.0}
    args = change(args)
    with pytest.raises(LplError, match=message):
        cpu.adam_replay_cpu(**args, betas=BETAS, eps=EPS, decoupled=True)


def test_unavailable_kernel_is_reported(fresh_library):
    fresh_library(_build.ADAM_REPLAY, compiler=False)
    with pytest.warns(RuntimeWarning, match="linearised Adam replay kernel unavailable"):
        assert not cpu.adam_replay_available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert not cpu.adam_replay_available()
    data = {name: value.float().contiguous() for name, value in make_data(40, 2, 4, 3).items()}
    with pytest.raises(LplError, match="unavailable"):
        cpu.adam_replay_cpu(data["pool_grads"], data["hessian_vectors"], data["hessian_values"],
                            data["reference_updates"], data["val_grads"], data["lr"], torch.tensor([[0, 1]]),
                            betas=BETAS, eps=EPS, weight_decay=0.0, decoupled=True)


def test_environment_can_force_the_torch_path(monkeypatch):
    monkeypatch.setenv("LPL_CPU_KERNEL", "torch")
    assert not cpu.adam_replay_available()


@pytest.mark.parametrize("decoupled", [True, False])
def test_bfloat16_rows_are_read_exactly_as_their_float32_widening(decoupled):
    """The sensitivity file stores the d-sized rows in bfloat16: fed as they are, the kernel gives bit for bit what
    it gives on their float32 widening (the widening is exact), and needs half the memory."""
    data = make_data(2100, 5, 6, 4)
    f32 = {name: value.float().contiguous() for name, value in data.items()}
    narrow = {name: f32[name].bfloat16()
              for name in ("pool_grads", "hessian_vectors", "reference_updates", "val_grads")}
    narrow["coupled"] = (0.1 * f32["theta"]).bfloat16()
    wide = {name: value.float() for name, value in narrow.items()}
    orders = torch.randint(0, 4, (5, 6), generator=torch.Generator().manual_seed(3))

    def replay(rows):
        return cpu.adam_replay_cpu(
            rows["pool_grads"], rows["hessian_vectors"], f32["hessian_values"], rows["reference_updates"],
            rows["val_grads"], f32["lr"], orders, betas=BETAS, eps=EPS, weight_decay=0.1, decoupled=decoupled,
            coupled_decay=None if decoupled else rows["coupled"])

    got, want = replay(narrow), replay(wide)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert want[0].abs().max() > 1e-3


@pytest.mark.parametrize("default_dtype", [torch.bfloat16, torch.float64])
def test_the_default_dtype_does_not_change_the_kernels_buffers(default_dtype):
    """Its outputs are float32 buffers the C code writes: allocated from the default dtype, a 16-bit default
    overflowed them (heap corruption) and a float64 one held garbage."""
    data = make_data(40, 2, 5, 3)
    orders = torch.tensor([[2, 0, 1, 1, 0]])
    expected = run_kernel(data, orders, 0.01, True)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        delta, dots = run_kernel(data, orders, 0.01, True)
    finally:
        torch.set_default_dtype(previous)
    assert delta.dtype == torch.float32 and torch.equal(delta, expected[0]) and torch.equal(dots, expected[1])
