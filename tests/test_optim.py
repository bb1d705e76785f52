import math

import pytest
import torch

from fashion_cnn.training.config import TrainConfig
from fashion_cnn.training.optim import KerasAdam, lr_at


def test_keras_adam_matches_hand_computed_steps():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = KerasAdam([w], lr=0.1, beta_1=0.9, beta_2=0.999, epsilon=1e-7)
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([0.1, 2.0])]
    expect, m, v = [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]
    for t, g in enumerate(grads, start=1):
        w.grad = g.clone()
        opt.step()
        lr_t = 0.1 * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        for i in range(2):
            m[i] = 0.9 * m[i] + 0.1 * float(g[i])
            v[i] = 0.999 * v[i] + 0.001 * float(g[i]) ** 2
            expect[i] -= lr_t * m[i] / (math.sqrt(v[i]) + 1e-7)
        assert torch.allclose(w.detach(), torch.tensor(expect), rtol=0, atol=1e-6)


def test_keras_epsilon_differs_from_torch_adam_on_small_gradients():
    # With tiny gradients, Keras' eps (added to sqrt(v), not to sqrt(v_hat)) gives a different
    # first step than torch.optim.Adam(eps=1e-7): the reason KerasAdam exists.
    g = torch.tensor([1e-8])
    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    ka, ta = KerasAdam([a], lr=1e-3), torch.optim.Adam([b], lr=1e-3, eps=1e-7)
    a.grad, b.grad = g.clone(), g.clone()
    ka.step()
    ta.step()
    lr_t = 1e-3 * math.sqrt(1 - 0.999) / (1 - 0.9)
    assert math.isclose(float(a.detach()), -lr_t * 1e-9 / (math.sqrt(1e-3) * 1e-8 + 1e-7), rel_tol=1e-4)
    assert not math.isclose(float(a.detach()), float(b.detach()), rel_tol=0.05)


def test_schedules():
    cfg = TrainConfig(lr=1.0, schedule="onecycle", warmup=0.25, final_lr_fraction=0.0)
    values = [lr_at(s, 100, cfg) for s in range(100)]
    assert max(values) == 1.0 and values.index(1.0) == 24
    assert values[0] == 1 / 25 and values[-1] == 0.0
    assert lr_at(5, 100, TrainConfig(lr=0.3)) == 0.3


def test_keras_adam_is_independent_of_memory_layout():
    # The fused kernel walks tensors in memory order: a channels_last kernel with a contiguous
    # gradient, or with contiguous m and v loaded (as a checkpoint stores them), must still pair
    # each weight with its own gradient and moments.
    torch.manual_seed(0)
    a = torch.randn(8, 3, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    b = a.detach().clone().contiguous().requires_grad_()
    opt_a = KerasAdam([a], lr=1e-2, weight_decay=0.01)
    opt_b = KerasAdam([b], lr=1e-2, weight_decay=0.01)
    for step in range(5):
        g = torch.randn(8, 3, 3, 3)
        a.grad, b.grad = g.clone(), g.clone().contiguous(memory_format=torch.channels_last)
        opt_a.step()
        opt_b.step()
        if step == 2:  # a round trip through a state dict with contiguous m and v
            saved = opt_a.state_dict()
            for state in saved["state"].values():
                state["m"], state["v"] = state["m"].contiguous(), state["v"].contiguous()
            opt_a.load_state_dict(saved)
    assert torch.equal(a.detach(), b.detach())
    assert a.detach().is_contiguous(memory_format=torch.channels_last)


def _adam_run(use_kernel: bool, threads: int = 2, steps: int = 6):
    """Six steps of KerasAdam on tensors of several layouts and sizes (130,000 values: the two
    threads split the third tensor between them)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (48, 2400), (10,)]
    params = [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in shapes]
    params[2] = torch.nn.Parameter(params[2].detach().contiguous(memory_format=torch.channels_last))
    opt = KerasAdam(params, lr=1e-2, weight_decay=0.05)
    opt.use_kernel = use_kernel
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)  # contiguous, beside channels_last
            opt.step()
    finally:
        torch.set_num_threads(previous)
    return params, opt


def test_adam_kernel_equals_torch_fused_update():
    from fashion_cnn.models import kernels
    if not kernels.available():
        pytest.skip(kernels.status())
    mine, opt = _adam_run(use_kernel=True)
    assert opt.runs_kernel(mine)
    theirs, torch_opt = _adam_run(use_kernel=False)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-6)
        for moment in ("m", "v"):
            torch.testing.assert_close(opt.state[a][moment], torch_opt.state[b][moment],
                                       rtol=1e-5, atol=0)
    assert mine[2].is_contiguous(memory_format=torch.channels_last)
    # the split between threads changes nothing
    one_thread, _ = _adam_run(use_kernel=True, threads=1)
    assert all(torch.equal(a, b) for a, b in zip(mine, one_thread))


def test_adam_kernel_leaves_other_dtypes_to_torch():
    from fashion_cnn.models import kernels
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = KerasAdam([w], lr=0.1)
    assert not opt.runs_kernel([w]) and not kernels.adam_eligible(w)
    w.grad = torch.tensor([0.5, -1.0], dtype=torch.float64)
    opt.step()
    assert w.dtype == torch.float64 and w.detach().tolist() != [1.0, -2.0]


def test_adam_follows_parameters_whose_data_changes_between_steps():
    """A step reuses its lists and the kernel's pointer tables until the parameters change:
    a parameter without a gradient, the kernel switched off, or data replaced by a copy in
    new memory (the old pointers would update freed memory and leave the parameter as it
    was) all start a fresh plan."""
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    opt = KerasAdam([a, b], lr=0.1)
    ref_a, ref_b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(3))
    ref = KerasAdam([ref_a, ref_b], lr=0.1)
    ref.use_kernel = False
    for step in range(5):
        for p in (a, b, ref_a, ref_b):
            p.grad = torch.full(p.shape, 0.5 + step)
        if step == 1:  # b has no gradient: only a moves, and only a's count advances
            b.grad = ref_b.grad = None
        if step == 2:
            opt.use_kernel = False
        if step == 3:
            opt.use_kernel = True
            before = a.data_ptr()
            a.data = a.data.clone()
            assert a.data_ptr() != before
        opt.step()
        ref.step()
        torch.testing.assert_close(a.detach(), ref_a.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b.detach(), ref_b.detach(), rtol=1e-6, atol=1e-7)
    assert opt.runs_kernel([a, b])
    assert float(opt.state[b]["step"]) == float(ref.state[ref_b]["step"])


def test_adam_runs_optimizer_hooks_and_keeps_its_profiler_label():
    w = torch.nn.Parameter(torch.ones(3))
    opt = KerasAdam([w], lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    w.grad = torch.ones(3)
    opt.step()
    assert calls == ["pre", "post"] and float(w.detach()[0]) < 1.0
    with torch.profiler.profile() as prof:
        w.grad = torch.ones(3)
        opt.step()
    assert "Optimizer.step#KerasAdam.step" in {e.key for e in prof.key_averages()}
