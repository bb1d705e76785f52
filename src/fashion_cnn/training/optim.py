"""Optimizers and learning-rate schedules.

KerasAdam reproduces Keras' Adam update, epsilon placement included (up to float rounding):

    m <- b1*m + (1-b1)*g ;  v <- b2*v + (1-b2)*g^2
    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t)
    w <- w - lr_t * m / (sqrt(v) + eps)

torch.optim.Adam instead divides by (sqrt(v)/sqrt(1-b2^t) + eps): its epsilon is effectively
larger by 1/sqrt(1-b2^t) (about 32x at the first step), which changes the first updates.
"""

from __future__ import annotations

import math

import torch

from ..models import kernels
from .config import TrainConfig


def _laid_out_like(param: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` with `param`'s strides. The fused kernel below walks every tensor of a
    parameter in memory order, so a contiguous m beside a channels_last kernel would pair
    the wrong elements."""
    if tensor.stride() == param.stride():
        return tensor
    return torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)


def _plan_key(params, use_kernel: bool) -> tuple:
    """What a plan depends on: the parameters' storage (a parameter whose data was replaced,
    by a dtype or layout change, gets a new address) and the kernel switch."""
    return (use_kernel, *(p.data_ptr() for p in params))


class _GroupPlan:
    """What a step of one parameter group reuses while its parameters and state stay the
    same: the parameters that have gradients, their m, v and step tensors, and the kernel's
    pointer tables (None where torch's kernel runs)."""

    def __init__(self, params, state, kernel_switch: bool, runs_kernel: bool):
        self.params = params
        self.key = _plan_key(params, kernel_switch)
        self.ms = [state[p]["m"] for p in params]
        self.vs = [state[p]["v"] for p in params]
        self.steps = [state[p]["step"] for p in params]  # float64 on the CPU (see KerasAdam)
        # torch's fused kernel reads the step count where the parameters are: float32 copies
        # on a GPU, kept in step with self.steps (whole numbers: exact up to 2**24 steps)
        device = params[0].device
        self.device_steps = (self.steps if device.type == "cpu" else
                             [step.to(device, torch.float32) for step in self.steps])
        self.tensors = kernels.AdamTensors(params, self.ms, self.vs) if runs_kernel else None


class KerasAdam(torch.optim.Optimizer):
    """Adam in Keras' form; `weight_decay` is decoupled (AdamW, as Keras 3's `weight_decay`)."""

    def __init__(self, params, lr=1e-3, beta_1=0.9, beta_2=0.999, epsilon=1e-7, weight_decay=0.0):
        defaults = dict(lr=lr, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                        weight_decay=weight_decay)
        super().__init__(params, defaults)
        # the C kernel (kernels.adam_update) where it is compiled and every tensor is float32
        # on the CPU; False: torch's fused AdamW kernel. Both give Keras' update.
        self.use_kernel = True
        # by group index; rebuilt when the parameters change, cleared on load_state_dict
        self._plans: dict[int, _GroupPlan] = {}

    def runs_kernel(self, params) -> bool:
        return self.use_kernel and kernels.available() and all(
            kernels.adam_eligible(p) for p in params)

    def load_state_dict(self, state_dict) -> None:
        """As torch's (m and v move to their weight's device), then m and v in their weight's
        layout: a checkpoint stores them contiguous, and the fused step needs a channels_last
        kernel's moments channels_last. The step count stays a float64 on the CPU."""
        super().load_state_dict(state_dict)
        self._plans.clear()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    state["m"] = _laid_out_like(p, state["m"])
                    state["v"] = _laid_out_like(p, state["v"])
                    state["step"] = state["step"].to("cpu", torch.float64)

    def _plan(self, index: int, group: dict) -> _GroupPlan | None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return None
        plan = self._plans.get(index)
        if plan is None or plan.key != _plan_key(params, self.use_kernel):
            for p in params:
                state = self.state[p]
                if not state:
                    # step is a float tensor so that checkpoints hold only tensors
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            plan = self._plans[index] = _GroupPlan(params, self.state, self.use_kernel,
                                                   self.runs_kernel(params))
        return plan

    def step(self, closure=None):
        """One update. Optimizer hooks run as for torch's optimizers, and under torch's
        profiler the step is labelled as theirs are; otherwise the update runs without that
        wrapper (its record_function and hook loops took about 0.1 ms of a training step)."""
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _global_optimizer_hooks() or torch.autograd._profiler_enabled()):
            return _hooked_update(self, closure)
        return self._update(closure)

    # torch.optim.Optimizer wraps an unmarked step in its profiling and hooks wrapper
    step.hooked = True

    @torch.no_grad()
    def _update(self, closure=None):
        loss = closure() if closure is not None else None
        for index, group in enumerate(self.param_groups):
            plan = self._plan(index, group)
            if plan is None:
                continue
            params, ms, vs, steps = plan.params, plan.ms, plan.vs, plan.steps
            grads = [_laid_out_like(p, p.grad) for p in params]
            # one iteration count for the group, as Keras' optimizer.iterations (on the CPU:
            # reading it never waits for a GPU)
            t = float(steps[0]) + 1.0
            torch._foreach_zero_(steps)
            torch._foreach_add_(steps, t)
            if plan.device_steps is not steps:
                torch._foreach_zero_(plan.device_steps)
                torch._foreach_add_(plan.device_steps, t)
            b1, b2, lr, eps = group["beta_1"], group["beta_2"], group["lr"], group["epsilon"]
            if plan.tensors is not None:
                # one pass over all tensors (torch's kernel below sets up each tensor apart)
                plan.tensors.update(grads, lr=lr,
                                    alpha=lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t),
                                    beta1=b1, beta2=b2, epsilon=eps,
                                    weight_decay=group["weight_decay"])
                continue
            # torch's fused AdamW kernel (one pass over each tensor: 0.11 ms per step for
            # model1/model2 here against 0.19-0.20 ms for six foreach ops) divides by
            # sqrt(v)/sqrt(1-b2^t) + eps'. With eps' = eps/sqrt(1-b2^t) that is
            # lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v) + eps): Keras' update, with the decoupled
            # decay w <- w*(1 - lr*wd) first; only the rounding differs (~1e-7).
            torch._fused_adamw_(params, grads, ms, vs, [], plan.device_steps, amsgrad=False,
                                lr=lr, beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                                eps=eps / math.sqrt(1.0 - b2 ** t), maximize=False)
        return loss


_hooked_update = torch.optim.Optimizer.profile_hook_step(KerasAdam._update)


def _global_optimizer_hooks() -> bool:
    """Whether hooks were registered for every optimizer (register_optimizer_step_*_hook)."""
    from torch.optim import optimizer as torch_optimizer

    return bool(torch_optimizer._global_optimizer_pre_hooks
                or torch_optimizer._global_optimizer_post_hooks)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return KerasAdam(params, cfg.lr, cfg.beta_1, cfg.beta_2, cfg.epsilon, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return KerasAdam(params, cfg.lr, cfg.beta_1, cfg.beta_2, cfg.epsilon,
                         cfg.weight_decay or 0.01)
    # SGD: decay only weights of rank > 1 (kernels), as is usual for BatchNorm networks.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0)


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`: a pure function of
    the step, so a resumed run needs no scheduler state."""
    if cfg.schedule == "constant" or total_steps <= 1:
        return cfg.lr
    warm = int(cfg.warmup * total_steps)
    final = cfg.lr * cfg.final_lr_fraction
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total_steps - warm - 1))
    if cfg.schedule == "onecycle":
        return cfg.lr + (final - cfg.lr) * progress
    return final + (cfg.lr - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
