"""Waiting on many actors at once (``lsgd_ray/_internal/waiting.py``): a reply, a death, a late
answer and an actor's own error, each told apart, on a local Ray."""

import os
import signal

import pytest
import ray

from lsgd_ray._internal.waiting import LATE, ActorTimeoutError, answers, get_all, replies_or_deaths
from tests.helpers import kill_if_alive


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class Peer:
    def echo(self, value):
        return value

    def hang(self):
        os.kill(os.getpid(), signal.SIGSTOP)

    def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    def fail(self):
        raise ValueError("its own error")

    def call(self, other):  # an actor that calls another: that one's death is this call's error
        return ray.get(other.echo.remote(1))

    def pid(self):
        return os.getpid()


@pytest.fixture
def peers():
    made = [Peer.remote() for _ in range(3)]
    pids = ray.get([p.pid.remote() for p in made])
    yield made
    for pid in pids:  # a stopped process is killed, not left behind
        kill_if_alive(pid)


def test_a_reply_a_death_and_a_late_answer_are_told_apart(peers):
    ok, dead, hung = peers
    refs = [ok.echo.remote(7), dead.die.remote(), hung.hang.remote()]
    replies = replies_or_deaths(refs, 3.0, ["ok", "dead", "hung"], late_ok=True)
    assert replies[0] == (7, "") and replies[2] == (None, LATE)
    assert replies[1][0] is None and replies[1][1].startswith("died ("), replies[1]
    # the side calls' form: the replies, None for the others
    assert answers([ok.echo.remote(8), dead.echo.remote(1), hung.echo.remote(1)], 1.0) == [8, None, None]
    # without late_ok, one that did not answer is named
    with pytest.raises(ActorTimeoutError, match="no answer within 1s from hung"):
        replies_or_deaths([ok.echo.remote(1), hung.echo.remote(1)], 1.0, ["ok", "hung"])
    with pytest.raises(ActorTimeoutError, match="from hung: busy"):
        get_all([hung.echo.remote(1)], 1.0, ["hung"], hint="busy")
    assert answers([], 1.0) == [] and replies_or_deaths([], 1.0, []) == []


def test_an_actors_own_error_propagates_even_when_it_is_about_a_dead_actor(peers):
    ok, dead, _ = peers
    with pytest.raises(ValueError, match="its own error"):
        answers([ok.fail.remote()], 5.0)
    dead.die.remote()
    assert answers([dead.echo.remote(1)], 10.0) == [None]
    # ok's call failed because the actor it called died: ok itself lives, so this is not a death
    with pytest.raises(ray.exceptions.RayTaskError):
        answers([ok.call.remote(dead)], 10.0)
    with pytest.raises(ray.exceptions.RayTaskError):
        replies_or_deaths([ok.call.remote(dead)], 10.0, ["ok"], late_ok=True)
    assert answers([ok.echo.remote(3)], 5.0) == [3]
