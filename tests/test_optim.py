"""The workers' own SGD (``lsgd_ray.optim.SGD``) against ``torch.optim.SGD``: the same weights
bit for bit, the same state_dict both ways, and no import of torch._dynamo (its reason to be)."""

import copy
import subprocess
import sys

import pytest
import torch

from lsgd_ray.config import OptimizerConfig
from lsgd_ray.flat import FlatState
from lsgd_ray.models import small_cnn
from lsgd_ray.optim import SGD, build_optimizer, torch_optimizer

SETTINGS = [  # (momentum, nesterov, weight_decay)
    (0.0, False, 0.0),
    (0.0, False, 1e-3),
    (0.9, False, 0.0),
    (0.9, True, 5e-4),
    (0.5, False, 1e-3),
]


def batches(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(count)]


def train(model, optimizer, data, flat=None):
    for x, y in data:
        if flat is not None:  # as a Worker: gradients are views of one flat buffer, zeroed in place
            flat.zero_grad()
        else:
            optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def pair(momentum, nesterov, weight_decay):
    torch.manual_seed(0)
    ours = small_cnn((1, 28, 28), 10, width=8)  # convolutions and BatchNorm: parameters of several shapes
    theirs = copy.deepcopy(ours)
    kw = dict(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return ours, SGD(ours.parameters(), **kw), theirs, torch.optim.SGD(theirs.parameters(), **kw)


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize(("momentum", "nesterov", "weight_decay"), SETTINGS)
def test_the_workers_sgd_steps_as_torchs_bit_for_bit(momentum, nesterov, weight_decay):
    ours, opt, theirs, ref = pair(momentum, nesterov, weight_decay)
    flat = FlatState(ours)  # ours as a Worker holds it; torch's as a plain model
    data = batches(12)
    train(ours, opt, data, flat)
    train(theirs, ref, data)
    assert same_weights(ours, theirs)
    mine, torchs = opt.state_dict(), ref.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys() and bool(mine["state"]) == (momentum > 0)
    for k, state in torchs["state"].items():
        assert torch.equal(mine["state"][k]["momentum_buffer"], state["momentum_buffer"])


@pytest.mark.parametrize("direction", ["torch into ours", "ours into torch"])
def test_a_state_dict_from_either_loads_into_the_other_and_goes_on_alike(direction):
    """A checkpoint (or a data-parallel replica) written before this optimizer existed loads."""
    ours, opt, theirs, ref = pair(0.9, True, 1e-4)
    data = batches(10, seed=1)
    train(ours, opt, data[:5])
    train(theirs, ref, data[:5])
    source, target = (ref, opt) if direction == "torch into ours" else (opt, ref)
    target.load_state_dict(copy.deepcopy(source.state_dict()))
    train(ours, opt, data[5:])
    train(theirs, ref, data[5:])
    assert same_weights(ours, theirs)


def test_a_fresh_state_and_bad_input():
    ours, opt, theirs, ref = pair(0.9, False, 0.0)
    data = batches(4, seed=2)
    train(ours, opt, data)
    train(theirs, ref, data)
    opt.state.clear()  # a Worker reset to the leader's weights starts a fresh momentum
    ref.state.clear()
    train(ours, opt, data)
    train(theirs, ref, data)
    assert same_weights(ours, theirs)
    opt.zero_grad()
    assert all(p.grad is None for p in ours.parameters())
    with pytest.raises(ValueError, match="different number of parameter groups or parameters"):
        opt.load_state_dict({"state": {}, "param_groups": [{**opt.state_dict()["param_groups"][0], "params": [0]}]})
    with pytest.raises(ValueError, match="Nesterov momentum requires a momentum"):
        SGD(ours.parameters(), lr=0.1, nesterov=True)


def test_sgd_is_torchs_off_the_cpu_and_the_other_optimizers_are_torchs():
    """On a GPU torch steps all tensors at once (foreach), which this SGD does not (``meta``
    stands for a device other than the CPU here)."""
    cpu, meta = [torch.nn.Parameter(torch.zeros(3))], [torch.nn.Parameter(torch.zeros(3, device="meta"))]
    assert type(build_optimizer(cpu, OptimizerConfig(name="sgd"))) is SGD
    assert type(build_optimizer(meta, OptimizerConfig(name="sgd"))) is torch.optim.SGD
    assert type(build_optimizer(cpu, OptimizerConfig(name="adam"))) is torch.optim.Adam
    assert type(torch_optimizer(cpu, OptimizerConfig(name="sgd"))) is torch.optim.SGD  # the baselines' own


def test_stepping_the_workers_sgd_never_imports_torch_dynamo():
    """In a fresh interpreter, as a Worker's process: torch.optim's optimizers import it when
    made and at each step (1.1 CPU-s, a quarter of a worker's start-up)."""
    code = (
        "import sys, torch\n"
        "from lsgd_ray.config import OptimizerConfig\n"
        "from lsgd_ray.optim import build_optimizer\n"
        "model = torch.nn.Linear(4, 2)\n"
        "opt = build_optimizer(model.parameters(), OptimizerConfig(name='sgd', lr=0.1, momentum=0.9))\n"
        "model(torch.randn(3, 4)).sum().backward()\n"
        "opt.step(); opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
