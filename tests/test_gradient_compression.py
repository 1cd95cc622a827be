"""torch's gradient compression hooks on a worker's flat gradient (``FlatGradientHook``), in a
torch.distributed world of one in this process. No Ray."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist

from lsgd_ray.algorithms.data_parallel import powersgd_elements
from lsgd_ray.comm_hooks import FlatGradientHook
from lsgd_ray.config import ConfigError, DataParallelConfig
from lsgd_ray.flat import FlatState
from lsgd_ray.models import mlp

MODEL = functools.partial(mlp, (12,), 5, hidden=16)


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory):
    path = tmp_path_factory.mktemp("pg") / "rendezvous"
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _gradients(steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = sum(p.numel() for p in MODEL().parameters())
    return [torch.randn(size, generator=g) for _ in range(steps)]


def _run(hook: FlatGradientHook, state: FlatState, params, gradients) -> list[torch.Tensor]:
    out = []
    for gradient in gradients:
        state.grad.copy_(gradient)
        hook(state.grad, params, 1)
        out.append(state.grad.clone())
    return out


def test_powersgd_writes_its_low_rank_average_into_the_flat_gradient(world_of_one):
    torch.manual_seed(0)
    model = MODEL()
    state = FlatState(model)
    params = list(model.parameters())
    hook = FlatGradientHook("powersgd", rank=1, start=2, error_feedback=True, warm_start=True)
    gradients = _gradients(4)
    out = _run(hook, state, params, gradients)
    assert torch.equal(out[0], gradients[0]) and torch.equal(out[1], gradients[1])  # plain steps first
    weight = params[0]  # 16 x 12: compressed to rank 1
    n, m = weight.shape
    first = out[2][: n * m].view(n, m)
    assert torch.linalg.matrix_rank(first) == 1 and not torch.equal(out[2], gradients[2])
    assert torch.equal(out[2][n * m : n * m + n], gradients[2][n * m : n * m + n])  # a bias: sent whole
    assert hook.state.iter == 4 and 0 in hook.state.error_dict  # error feedback kept
    shapes = [tuple(p.shape) for p in params]
    assert hook.state.total_numel_after_compression == 2 * powersgd_elements(shapes, 1)


def test_the_powersgd_state_continues_exactly_from_its_state_dict(world_of_one):
    torch.manual_seed(0)
    model = MODEL()
    state = FlatState(model)
    params = list(model.parameters())
    gradients = _gradients(6, seed=1)
    hook = FlatGradientHook("powersgd", rank=2, start=2, error_feedback=True, warm_start=True)
    _run(hook, state, params, gradients[:4])
    again = FlatGradientHook("powersgd", rank=2, start=2, error_feedback=True, warm_start=True)
    again.load_state_dict(hook.state_dict(), torch.device("cpu"))
    fresh = FlatGradientHook("powersgd", rank=2, start=2, error_feedback=True, warm_start=True)
    fresh.state.iter = 4  # compressing already, but no error feedback or warm start to go on from
    expected = _run(hook, state, params, gradients[4:])
    assert all(torch.equal(a, b) for a, b in zip(_run(again, state, params, gradients[4:]), expected))
    assert not all(torch.equal(a, b) for a, b in zip(_run(fresh, state, params, gradients[4:]), expected))


def test_bf16_compression_rounds_the_gradient_to_bfloat16(world_of_one):
    torch.manual_seed(0)
    model = MODEL()
    state = FlatState(model)
    hook = FlatGradientHook("bf16", rank=1, start=0, error_feedback=False, warm_start=False)
    gradient = _gradients(1)[0]
    (out,) = _run(hook, state, list(model.parameters()), [gradient])
    assert torch.equal(out, gradient.to(torch.bfloat16).float())
    assert hook.state_dict() is None


def test_powersgd_elements_by_hand():
    """A 16 x 12 weight at rank 1: 28 elements instead of 192; a 5 x 16 one: 21 < 80/2; the
    biases (16, 5) whole; rank 8 on 16 x 12: 224 > 192/2, sent whole."""
    assert powersgd_elements([(16, 12), (16,), (5, 16), (5,)], 1) == 28 + 16 + 21 + 5
    assert powersgd_elements([(16, 12)], 8) == 192


def test_settings_torch_would_refuse_are_refused_first():
    with pytest.raises(ConfigError, match="powersgd_start must be > 1 with error_feedback or warm_start"):
        DataParallelConfig(compression="powersgd", powersgd_start=1)
    DataParallelConfig(compression="powersgd", powersgd_start=0, error_feedback=False, warm_start=False)
    with pytest.raises(ConfigError, match="unknown compression 'topk'"):
        DataParallelConfig(compression="topk")
