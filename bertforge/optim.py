"""Optimisers and the learning-rate schedule of BERT pre-training.

AdamW (decoupled weight decay, Loshchilov & Hutter 2019) as in the BERT reference, and LAMB (You et al.
2019, "Large Batch Optimization for Deep Learning") for very large batches. Neither decays biases or
LayerNorm weights. The schedule is the paper's: linear warm-up, then linear decay to 0.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from bertforge.errors import BertforgeError

OPTIMIZERS = ("adamw", "lamb")
MAX_DEFAULT_WARMUP = 10_000


def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None,
                 layer_lr_decay: float = 1.0) -> list[dict]:
    """Decayed weights, and biases + LayerNorm parameters (no decay); tied parameters appear once.

    With `layer_lr_decay` d < 1 (layer-wise learning-rate decay, as ELECTRA and DeBERTa fine-tune), the groups
    are split by depth and each gets the rate lr * d ** (top - depth): the task head and pooler train at `lr`,
    encoder layer i (from 0) at lr * d ** (L - i), the embeddings at lr * d ** (L + 1). Lower layers, which hold
    the most general pre-trained features, move least.
    """
    if not 0 < layer_lr_decay <= 1:
        raise BertforgeError(f"--layer-lr-decay must be in (0, 1], got {layer_lr_decay}")
    if layer_lr_decay < 1 and lr is None:
        raise BertforgeError("layer-wise learning-rate decay needs the base learning rate")
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            decayed = not (isinstance(module, nn.LayerNorm) or name == "bias")
            depth = _depth(module_name) if layer_lr_decay < 1 else TOP
            groups.setdefault((depth, decayed), []).append(param)
    top = 1 + max((d for d, _ in groups if d != TOP), default=0)  # the head's depth: above the last layer
    result = []
    for depth in sorted({d for d, _ in groups}, reverse=True):
        for decayed in (True, False):
            group: dict = {"params": groups.get((depth, decayed), []), "weight_decay": weight_decay if decayed else 0.0}
            if layer_lr_decay < 1:
                group["lr"] = lr * layer_lr_decay ** (top - min(depth, top))
            result.append(group)
    return result


TOP = 1 << 30  # depth of what sits above the encoder (pooler, task heads)
LAYER = re.compile(r"(?:^|\.)(?:(embeddings)|layers\.(\d+))(?:\.|$)")


def _depth(module_name: str) -> int:
    """0 for the embeddings, i + 1 for encoder layer i, TOP for everything above (pooler, heads)."""
    match = LAYER.search(module_name)
    if match is None:
        return TOP
    return 0 if match.group(1) else int(match.group(2)) + 1


class Lamb(torch.optim.Optimizer):
    """LAMB: Adam moments with bias correction, decoupled weight decay and a layer-wise trust ratio.

    For each parameter tensor x with gradient g at step t (You et al. 2019, Algorithm 2):
        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay * x
        x = x - lr * (||x|| / ||u||) * u        (trust ratio 1 when either norm is 0)
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0) -> None:
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid LAMB hyper-parameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                state["step"] += 1
                step = state["step"].item()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                update = (exp_avg / (1 - beta1 ** step)) / denom
                weights = param.float()
                if group["weight_decay"]:
                    update.add_(weights, alpha=group["weight_decay"])
                weight_norm = weights.norm()
                update_norm = update.norm()
                trust = torch.where((weight_norm > 0) & (update_norm > 0),
                                    weight_norm / update_norm, torch.ones_like(weight_norm))
                param.sub_((update * (group["lr"] * trust)).to(param.dtype))
        return loss


def build_optimizer(model: nn.Module, name: str, *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                    layer_lr_decay: float = 1.0) -> torch.optim.Optimizer:
    """`adamw` or `lamb`, over `param_groups(model, weight_decay, lr=lr, layer_lr_decay=layer_lr_decay)`.

    AdamW uses PyTorch's fused kernel on CPU and CUDA alike: one pass over all parameters instead of a kernel per
    tensor, which is several times faster than the default implementation on the CPU too (docs/benchmarks.md).
    """
    groups = [g for g in param_groups(model, weight_decay, lr=lr, layer_lr_decay=layer_lr_decay) if g["params"]]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    if name == "lamb":
        return Lamb(groups, lr=lr, betas=betas, eps=eps)
    raise BertforgeError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def default_warmup_steps(total_steps: int) -> int:
    """10% of the steps, at most 10,000 (the BERT paper warms up for 10,000 of 1M steps)."""
    return min(MAX_DEFAULT_WARMUP, math.ceil(0.1 * total_steps))


class LinearSchedule(LRScheduler):
    """Linear warm-up to each group's peak rate over `warmup_steps`, then linear decay to 0 at `total_steps`.

    The factor for the update after `s` completed steps is (s + 1) / warmup during warm-up (so the first update
    is not wasted at rate 0), then (total - s) / (total - warmup). `scale` multiplies every rate; the loop lowers
    it when it rolls back from non-finite losses, and it is saved with the schedule's state.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int) -> None:
        if total_steps <= 0 or not 0 <= warmup_steps <= total_steps:
            raise BertforgeError(f"warm-up steps ({warmup_steps}) must be between 0 and the total steps "
                                 f"({total_steps})")
        self.warmup_steps, self.total_steps, self.planned_steps = warmup_steps, total_steps, total_steps
        self.scale = 1.0
        super().__init__(optimizer)

    def end_at(self, step: int) -> None:
        """Move the end of the decay to `step`, between the end of the warm-up and the planned total: how a run
        with a time budget makes its rate reach 0 when the budget does (`LoopConfig.decay_to_deadline`)."""
        self.total_steps = max(self.warmup_steps + 1, min(self.planned_steps, step))

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        return max(0.0, (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        return [base * self.scale * self.factor(self.last_epoch) for base in self.base_lrs]

    def rescale(self, scale: float) -> None:
        """Sets `scale`; the optimizer's rates follow at once (for the next update, without a step)."""
        self.scale = scale
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Also loads a LambdaLR's state (checkpoints written before this class): its `base_lrs` already hold
        any lowered rate, so its scale is 1."""
        state = {k: v for k, v in state_dict.items() if k != "lr_lambdas"}
        super().load_state_dict({"scale": 1.0, "planned_steps": state.get("total_steps", self.total_steps), **state})


def linear_schedule(optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int) -> LinearSchedule:
    """The paper's schedule (`LinearSchedule`) over `optimizer`'s groups."""
    return LinearSchedule(optimizer, warmup_steps=warmup_steps, total_steps=total_steps)
