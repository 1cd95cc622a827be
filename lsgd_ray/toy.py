"""The LSGD paper's toy problems, single-process: a symmetric 2-D landscape and matrix completion.

The 2-D objective is a sum of two double wells,

    f(x, y) = (x² − 1)² + (y² − 1)²,

chosen because its whole critical structure is known in closed form and is as symmetric as a
landscape gets: four global minima at (±1, ±1) with f = 0, four saddles at (±1, 0) and (0, ±1)
with f = 1, and a local maximum at the origin with f = 2 (``STATIONARY_POINTS``). It is invariant
under x → −x and y → −y, so workers started symmetrically around the origin have identical values
and their average stays exactly at the origin: an averaging method (EA(S)GD) keeps its center on
the worst stationary point, which is the "curse of symmetry" of the paper. A leader picks one of
the workers (ties go to the lowest index; noise breaks them in LSGD), and the others are pulled
into its basin. With an asymmetric start the average of workers in different basins is generally
not a stationary point at all, while the leader, which never pulls on itself, follows plain
gradient descent between leader changes and so ends on one. That needs weak or infrequent
coupling (the regime EASGD is used in): with α·p near 1 or τ = 1, EAGD's workers reach consensus
from a random start and the center ends on a minimum, while from the symmetric start they all
collapse onto the maximum.

Low-rank matrix completion: M = U Vᵀ (n × m, rank r, entries of unit variance), a seeded random
fraction Ω of the entries observed, and f(X, Y) = ½‖P_Ω(X Yᵀ − M)‖²_F over X (n × r), Y (m × r).
It has the continuous symmetry (X, Y) → (X A, Y A⁻ᵀ), so workers converge to different
factorisations whose average is not one. Defaults (n = m = 50, r = 3, 30 % observed, 4 workers)
run in about a second on one CPU core. The sum is not divided by |Ω|, so learning rates are in
units of 1/‖M‖₂ (≈ 0.05 works here).

Everything is numpy, float64, and seeded: the same arguments give bit-identical runs. The update
loops (``leader_steps``, ``elastic_steps``, on a shared ``Schedule``) take any vectorised
gradient and objective over a (workers, dim) array, so both problems share them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

Array = Any  # numpy array or torch tensor: the 2-D objective and gradient accept either

MINIMA = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
SADDLES = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
LOCAL_MAXIMUM = np.array([0.0, 0.0])
STATIONARY_POINTS = np.concatenate([MINIMA, SADDLES, LOCAL_MAXIMUM[None]])


def objective(xy: Array) -> Array:
    """f at points xy[..., 2]; written with elementwise ops only so torch tensors work too."""
    return ((xy**2 - 1) ** 2).sum(-1)


def gradient(xy: Array) -> Array:
    """∇f at points xy[..., 2]; the function is separable, so the gradient is elementwise."""
    return 4 * xy * (xy**2 - 1)


def symmetric_start(workers: int = 4, radius: float = 0.5) -> np.ndarray:
    """Workers on a circle around the local maximum, mirrored exactly in both axes.

    Built by sign flips rather than from angles around the full circle, because cos(3π/4) and
    −cos(π/4) differ in the last bit and that would break the symmetry the experiment is about.
    """
    if workers < 4 or workers % 4:
        raise ValueError(f"symmetric_start needs a multiple of 4 workers (one per quadrant), got {workers}")
    angles = (np.arange(workers // 4) + 0.5) * (np.pi / 2) / (workers // 4)
    base = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.concatenate([base * np.array(signs) for signs in [(1, 1), (-1, 1), (-1, -1), (1, -1)]])


def random_start(workers: int = 4, scale: float = 1.5, seed: int = 0) -> np.ndarray:
    """Workers drawn uniformly from the square [−scale, scale]²."""
    return np.random.default_rng(seed).uniform(-scale, scale, size=(workers, 2))


# ---------------------------------------------------------------------------------------------
# Update loops shared by both problems: x has shape (workers, dim).


@dataclass(frozen=True)
class Schedule:
    """What both methods' loops share: ``steps`` gradient steps of rate ``lr``, the pull every
    ``tau`` steps, gradient noise σ_g (0: exact gradients) and the seed of every draw."""

    steps: int
    lr: float
    tau: int
    grad_noise: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.tau < 1:
            raise ValueError(f"need steps >= 0 and tau >= 1, got steps={self.steps}, tau={self.tau}")

    def run(
        self, x: np.ndarray, grad_fn: Callable[[np.ndarray], np.ndarray], rng: np.random.Generator
    ) -> Iterator[bool]:
        """``steps`` noisy gradient steps on ``x`` in place, x ← x − η(∇f(x) + σ_g ξ), yielding
        after each whether it is a communication step (every τ-th), so the caller pulls in between."""
        for t in range(1, self.steps + 1):
            g = grad_fn(x)
            if self.grad_noise:
                g = g + self.grad_noise * rng.standard_normal(x.shape)
            x -= self.lr * g
            yield t % self.tau == 0


def _check_strength(strength: float, upper: float, name: str) -> None:
    if not 0.0 <= strength <= upper:
        raise ValueError(f"{name} must lie in [0, {upper:g}] for the pull to contract, got {strength}")


def leader_steps(
    x0: np.ndarray,
    grad_fn: Callable[[np.ndarray], np.ndarray],
    value_fn: Callable[[np.ndarray], np.ndarray],
    schedule: Schedule,
    lam: float,
    value_noise: float = 0.0,
) -> Iterator[tuple[np.ndarray, int]]:
    """L(S)GD: yield (workers, leader) at step 0 and after every step.

    Each step is x ← x − η(∇f(x) + σ_g ξ); every τ steps the leader is re-elected as the worker
    with the lowest (noisy, σ_f) objective and everyone does x ← x − λ(x − x_leader). The leader
    is only known at election time, so the yielded index is the last elected one.
    """
    _check_strength(lam, 1.0, "lam")
    rng = np.random.default_rng(schedule.seed)
    x = np.array(x0, dtype=np.float64)

    def elect() -> int:
        estimate = value_fn(x)
        if value_noise:
            estimate = estimate + value_noise * rng.standard_normal(estimate.shape)
        # A diverged worker must never lead: NaN would otherwise win argmin.
        return int(np.argmin(np.where(np.isnan(estimate), np.inf, estimate)))

    leader = elect()
    yield x.copy(), leader
    for communicate in schedule.run(x, grad_fn, rng):
        if communicate:
            leader = elect()
            x -= lam * (x - x[leader])
        yield x.copy(), leader


def elastic_steps(
    x0: np.ndarray,
    grad_fn: Callable[[np.ndarray], np.ndarray],
    schedule: Schedule,
    alpha: float,
    center: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """EA(S)GD: yield (workers, center) at step 0 and after every step.

    Gradient steps as in ``leader_steps``; every τ steps, with the old values on both sides,
    x_i ← x_i − α(x_i − c) and c ← c + α Σ_i (x_i − c). The center starts at the workers' mean
    unless given. α·p ≤ 1 keeps the center's update from overshooting the workers' mean.
    """
    x = np.array(x0, dtype=np.float64)
    _check_strength(alpha, 1.0 / len(x), "alpha (at most 1/workers)")
    rng = np.random.default_rng(schedule.seed)
    c = x.mean(axis=0) if center is None else np.array(center, dtype=np.float64)
    yield x.copy(), c.copy()
    for communicate in schedule.run(x, grad_fn, rng):
        if communicate:
            diff = x - c
            x -= alpha * diff
            c += alpha * diff.sum(axis=0)
        yield x.copy(), c.copy()


# ---------------------------------------------------------------------------------------------
# The 2-D landscape.


@dataclass(frozen=True)
class LandscapeRun:
    """One run on the 2-D landscape; values are the true (noise-free) objective."""

    positions: np.ndarray  # (steps + 1, workers, 2)
    values: np.ndarray  # (steps + 1, workers)
    leaders: np.ndarray | None = None  # (steps + 1,) for L(S)GD
    center: np.ndarray | None = None  # (steps + 1, 2) for EA(S)GD
    center_values: np.ndarray | None = None  # (steps + 1,)


STRENGTHS = {"lgd": 0.2, "eagd": 0.1}  # λ and α by default


def run_landscape(
    start: np.ndarray,
    method: str,
    *,
    steps: int = 500,
    lr: float = 0.02,
    strength: float | None = None,
    tau: int = 10,
    grad_noise: float = 0.0,
    value_noise: float = 0.0,
    seed: int = 0,
) -> LandscapeRun:
    """One run on the 2-D landscape with "lgd" (``strength`` = λ, 0.2 by default) or "eagd"
    (``strength`` = α, 0.1), EAGD's center started at the workers' mean. Exact gradients and an
    exact leader election unless ``grad_noise`` (σ_g) or, for the leader, ``value_noise`` (σ_f)
    make it the stochastic version, L(S)GD or EA(S)GD."""
    if method not in STRENGTHS:
        raise ValueError(f"method must be 'lgd' or 'eagd', got {method!r}")
    if method == "eagd" and value_noise:
        raise ValueError("value_noise is the leader election's: EA(S)GD elects no one")
    strength = STRENGTHS[method] if strength is None else strength
    schedule = Schedule(steps, lr, tau, grad_noise, seed)
    if method == "lgd":
        path, leaders = zip(*leader_steps(start, gradient, objective, schedule, strength, value_noise))
        positions = np.stack(path)
        return LandscapeRun(positions, objective(positions), leaders=np.array(leaders))
    positions, center = map(np.stack, zip(*elastic_steps(start, gradient, schedule, strength)))
    return LandscapeRun(positions, objective(positions), center=center, center_values=objective(center))


# ---------------------------------------------------------------------------------------------
# Low-rank matrix completion. Parameters travel flat, (..., (n + m)·r), so the shared loops apply.


@dataclass(frozen=True)
class CompletionProblem:
    target: np.ndarray  # M, (n, m)
    mask: np.ndarray  # observed entries Ω, bool (n, m)
    rank: int

    def split(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n, m = self.target.shape
        X = flat[..., : n * self.rank].reshape(*flat.shape[:-1], n, self.rank)
        Y = flat[..., n * self.rank :].reshape(*flat.shape[:-1], m, self.rank)
        return X, Y

    def residual(self, flat: np.ndarray) -> np.ndarray:
        X, Y = self.split(flat)
        return self.mask * (X @ Y.swapaxes(-1, -2) - self.target)

    def objective(self, flat: np.ndarray) -> np.ndarray:
        return 0.5 * (self.residual(flat) ** 2).sum(axis=(-2, -1))

    def gradient(self, flat: np.ndarray) -> np.ndarray:
        X, Y = self.split(flat)
        R = self.residual(flat)
        grad_x, grad_y = R @ Y, R.swapaxes(-1, -2) @ X
        return np.concatenate([grad_x.reshape(*flat.shape[:-1], -1), grad_y.reshape(*flat.shape[:-1], -1)], axis=-1)

    def recovery_error(self, flat: np.ndarray) -> np.ndarray:
        """‖X Yᵀ − M‖_F / ‖M‖_F over all entries, observed or not."""
        X, Y = self.split(flat)
        return np.linalg.norm(X @ Y.swapaxes(-1, -2) - self.target, axis=(-2, -1)) / np.linalg.norm(self.target)


def make_completion_problem(
    n: int = 50, m: int = 50, rank: int = 3, observed: float = 0.3, seed: int = 0
) -> CompletionProblem:
    """A random rank-r matrix with unit-variance entries and a uniformly random observed set."""
    rng = np.random.default_rng(seed)
    scale = rank**-0.25  # var(M_ij) = r · scale⁴ = 1
    U, V = scale * rng.standard_normal((n, rank)), scale * rng.standard_normal((m, rank))
    return CompletionProblem(U @ V.T, rng.random((n, m)) < observed, rank)


@dataclass(frozen=True)
class CompletionRun:
    values: np.ndarray  # (steps + 1, workers)
    reference_values: np.ndarray  # (steps + 1,) the leader's (LGD) or the center's (EAGD)
    reference_error: np.ndarray  # (steps + 1,) recovery error of the same
    best_worker_error: np.ndarray  # (steps + 1,) recovery error of the lowest-objective worker
    reference_grad_norm: np.ndarray  # (steps + 1,) ‖∇f‖ at the leader / center


def run_completion(
    problem: CompletionProblem,
    method: str,
    workers: int = 4,
    steps: int = 1000,
    lr: float = 0.05,
    strength: float = 0.1,
    tau: int = 10,
    init_scale: float = 0.1,
    seed: int = 0,
) -> CompletionRun:
    """Solve the completion problem with "lgd" (strength = λ) or "eagd" (strength = α), full gradients.

    Workers start from independent small Gaussian factors (the same ones for both methods given
    the seed); EAGD's center starts at their mean.
    """
    n, m = problem.target.shape
    x0 = init_scale * np.random.default_rng(seed).standard_normal((workers, (n + m) * problem.rank))
    schedule = Schedule(steps, lr, tau)
    if method == "lgd":
        leader_states = leader_steps(x0, problem.gradient, problem.objective, schedule, strength)
        states: Iterator[tuple[np.ndarray, np.ndarray]] = ((x, x[leader]) for x, leader in leader_states)
    elif method == "eagd":
        states = elastic_steps(x0, problem.gradient, schedule, strength)
    else:
        raise ValueError(f"method must be 'lgd' or 'eagd', got {method!r}")

    # Metrics step by step rather than on a stacked history, whose X Yᵀ would be steps·p·n·m floats.
    def metrics(x: np.ndarray, ref: np.ndarray) -> tuple[Any, ...]:
        values = problem.objective(x)
        best = x[np.argmin(values)]
        gn = np.linalg.norm(problem.gradient(ref))
        return values, problem.objective(ref), problem.recovery_error(ref), problem.recovery_error(best), gn

    return CompletionRun(*map(np.array, zip(*(metrics(x, ref) for x, ref in states))))
