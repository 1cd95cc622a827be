"""The workers' local optimizer, built from an :class:`OptimizerConfig`.

SGD on CPU is :class:`SGD`, this module's own: ``torch.optim.SGD``'s update, operation for
operation, without ``torch.optim``'s import of ``torch._dynamo`` (every ``torch.optim.Optimizer``
imports it when it is made and at each step: 1.1 CPU-s in each worker process, a quarter of a
worker's start-up on this 2-core machine). On a GPU ``torch.optim.SGD`` steps every tensor at
once (``foreach``), which this class does not: it is used there. Adam, AdamW and RMSprop are
``torch.optim``'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch

from lsgd_ray.config import OptimizerConfig


class Optimizer(Protocol):
    """What a worker asks of its optimizer (``torch.optim.Optimizer`` has it)."""

    param_groups: list[dict[str, Any]]
    state: Any

    def step(self) -> Any: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


OptimizerFactory = Callable[[Iterable[torch.nn.Parameter]], Optimizer]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> Optimizer:
    """A worker's optimizer: this module's ``SGD`` for SGD on CPU, else ``torch_optimizer``'s."""
    params = list(params)
    if cfg.name == "sgd" and all(p.device.type == "cpu" for p in params):
        return SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    return torch_optimizer(params, cfg)


def torch_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, as ``torch.optim`` builds it: what a plain PyTorch loop runs
    (the baselines the benchmarks compare with, and the exactness tests' references)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise AssertionError(f"unhandled optimizer {cfg.name!r}")  # OptimizerConfig validates names


class SGD:
    """``torch.optim.SGD`` on CPU, bit for bit: one parameter group, the update of its
    single-tensor path (weight decay, momentum with dampening 0, Nesterov) in the same
    operations, and the same ``state_dict`` (a checkpoint or replica written by either loads
    into the other)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if nesterov and momentum <= 0:
            raise ValueError("Nesterov momentum requires a momentum")
        # the keys of torch.optim.SGD's group, so that the two state_dicts match
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": list(params),
                "lr": lr,
                "momentum": momentum,
                "dampening": 0,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
            }
        ]
        self.state: defaultdict[torch.Tensor, dict[str, Any]] = defaultdict(dict)

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if decay != 0:
                    grad = grad.add(param, alpha=decay)
                if momentum != 0:
                    state = self.state[param]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = grad.detach().clone()
                    else:
                        buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                param.add_(grad, alpha=-lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        """As ``torch.optim.Optimizer.state_dict``: the state by parameter index, the groups with
        their parameters as indexes."""
        index = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups, start = [], 0
        for group in self.param_groups:
            count = len(group["params"])
            groups.append(
                {**{k: v for k, v in group.items() if k != "params"}, "params": list(range(start, start + count))}
            )
            start += count
        return {"state": {index[id(p)]: s for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``: the saved hyperparameters, and each
        momentum buffer copied to its parameter's dtype and device."""
        saved = state_dict["param_groups"]
        if len(saved) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved, self.param_groups)
        ):
            raise ValueError("loaded state dict has a different number of parameter groups or parameters")
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = defaultdict(dict)
        for i, s in state_dict["state"].items():
            param = params[int(i)]
            self.state[param] = {
                k: v.to(dtype=param.dtype, device=param.device) if isinstance(v, torch.Tensor) else v
                for k, v in s.items()
            }
        for group, s in zip(self.param_groups, saved):
            group.update({k: v for k, v in s.items() if k != "params"})
