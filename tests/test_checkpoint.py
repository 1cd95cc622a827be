"""Checkpoints: atomic commits, the last K kept, damaged or malicious files refused, and a run
stopped part-way that resumes to the same final weights as an uninterrupted one."""

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import types

import pytest
import ray
import torch

import lsgd_ray.checkpoint
from lsgd_ray import ConfigError, DiLoCoConfig, EASGDConfig, LSGDConfig, OptimizerConfig, TrainConfig, fit
from lsgd_ray.checkpoint import CheckpointError, list_checkpoints, load_latest, read_checkpoint, save_checkpoint
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp

MODEL = functools.partial(mlp, (16,), 4, hidden=32)
DATA = functools.partial(synthetic, n_train=1024, n_test=256)
SGD = OptimizerConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)

# ---------------------------------------------------------------------------- files (no Ray)


def save(run_dir, step, value=0.0, keep=3):
    state = {"workers": [{"weights": torch.full((4,), value)}], "trainer": {"history": []}}
    return save_checkpoint(run_dir, step, state, {"config": {}}, keep)


def test_commits_and_keeps_the_last_k(tmp_path):
    for step in (10, 20, 30, 40):
        save(tmp_path, step, float(step), keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000000040", "step-000000030"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporaries
    state, where = load_latest(tmp_path)
    assert where.name == "step-000000040" and state["workers"][0]["weights"][0] == 40.0
    meta = json.loads((where / "meta.json").read_text())
    assert meta["step"] == 40 and len(meta["sha256"]) == 64


def test_the_last_saved_are_kept_and_loaded_even_when_a_step_goes_back(tmp_path):
    """A chaos run's finding (async LSGD): a lone worker replaced at step 0 made the next
    checkpoint's name the lowest; kept by step, it was deleted as it was written, and the
    coordinator re-formed groups from the initial weights. The last saved are the newest."""
    for step in (100, 200, 50):
        save(tmp_path, step, float(step), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000050", "step-000000200"]
    state, where = load_latest(tmp_path)
    assert where.name == "step-000000050" and state["workers"][0]["weights"][0] == 50.0


def test_the_checkpoint_just_written_is_kept_even_with_the_clock_set_back(tmp_path, monkeypatch):
    clock = iter([2000.0, 3000.0, 1000.0])  # the third save's clock is behind the others
    monkeypatch.setattr(lsgd_ray.checkpoint, "time", types.SimpleNamespace(time=lambda: next(clock)))
    for step in (10, 20, 30):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in list_checkpoints(tmp_path)) == ["step-000000020", "step-000000030"]


def test_the_same_step_again_replaces_it(tmp_path):
    save(tmp_path, 10, 1.0)
    save(tmp_path, 10, 2.0)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000010"]
    assert load_latest(tmp_path)[0]["workers"][0]["weights"][0] == 2.0


def test_a_truncated_checkpoint_is_refused_and_the_previous_one_used(tmp_path, capsys):
    save(tmp_path, 10, 1.0)
    latest = save(tmp_path, 20, 2.0)
    data = (latest / "state.pt").read_bytes()
    (latest / "state.pt").write_bytes(data[: len(data) // 2])
    state, where = load_latest(tmp_path)
    assert where.name == "step-000000010" and state["workers"][0]["weights"][0] == 1.0
    assert "skipping checkpoint step-000000020" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="truncated or altered"):
        read_checkpoint(latest)


def test_a_meta_json_altered_yet_still_json_is_refused_and_the_previous_one_used(tmp_path):
    """Found by hypothesis (test_damaged_files): one byte of meta.json turned "saved_at" into
    "saved_ t"; the newest checkpoint read as sound, but it sorted as the oldest and resuming
    took the previous one. meta.json's fields are now sealed by a digest inside the state."""
    save(tmp_path, 10, 1.0)
    latest = save(tmp_path, 20, 2.0)
    for old, new in (('"saved_at"', '"saved_ t"'), ('"step": 20', '"step": 21'), ("{", '{"note": 1, ')):
        text = (latest / "meta.json").read_text()
        (latest / "meta.json").write_text(text.replace(old, new, 1))
        with pytest.raises(CheckpointError, match=r"meta\.json: its fields do not match the digest in state\.pt"):
            read_checkpoint(latest)
        state, where = load_latest(tmp_path)
        assert where.name == "step-000000010" and state["workers"][0]["weights"][0] == 1.0
        (latest / "meta.json").write_text(text)
    assert read_checkpoint(latest)["workers"][0]["weights"][0] == 2.0  # as written, it reads


def test_a_half_written_checkpoint_is_invisible(tmp_path):
    save(tmp_path, 10, 1.0)
    (tmp_path / "checkpoints" / ".tmp-step-000000020-123").mkdir()  # a crash mid-write
    assert load_latest(tmp_path)[1].name == "step-000000010"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_names_code_is_refused_without_running_it(tmp_path):
    where = save(tmp_path, 10)
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    (where / "state.pt").write_bytes(pickle.dumps({"format": 1, "x": payload}))
    meta = json.loads((where / "meta.json").read_text())
    import hashlib

    meta["sha256"] = hashlib.sha256((where / "state.pt").read_bytes()).hexdigest()  # digest passes
    (where / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights-only"):
        read_checkpoint(where)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path)


def test_nothing_to_resume_says_where_it_looked(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_latest(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no checkpoints under"):
        load_latest(tmp_path)


# ---------------------------------------------------------------------------- runs on Ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def run(tmp_path, name, algorithm="lsgd", **kw):
    defaults = dict(
        num_groups=2,
        workers_per_group=2,
        batch_size=16,
        eval_every_s=1000.0,
        optimizer=SGD,
        checkpoint_every_steps=8,
        quiet=True,
        seed=3,
    )
    defaults.update(kw)
    cfg = TrainConfig(algorithm=algorithm, output_dir=str(tmp_path / name), **defaults)
    return fit(MODEL, DATA, cfg)


def final_workers(result):
    state, _ = load_latest(result.output_dir)
    return state["workers"]


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("lsgd", dict(lsgd=LSGDConfig(tau=4, tau_global=8, lam=0.2, lam_global=0.2, proximal=0.1))),
        ("easgd", dict(easgd=EASGDConfig(tau=4))),
        ("diloco", dict(diloco=DiLoCoConfig(tau_global=8, fragments=2))),  # an outer step every 4
    ],
)
def test_a_stopped_run_resumes_to_the_same_weights(local_ray, tmp_path, algorithm, extra):
    whole = run(tmp_path, "whole", algorithm, max_steps=24, **extra)
    first = run(tmp_path, "first", algorithm, max_steps=12, **extra)  # stops part-way
    assert first.steps_per_worker == 12
    resumed = run(tmp_path, "resumed", algorithm, max_steps=24, resume=first.output_dir, **extra)
    assert resumed.resumed_from.endswith("step-000000012")
    assert resumed.steps_per_worker == whole.steps_per_worker == 24
    for a, b in zip(final_workers(whole), final_workers(resumed)):
        assert a["steps"] == b["steps"] == 24
        assert torch.equal(a["weights"], b["weights"]), f"worker {a['rank']} differs after resuming"
        assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    if algorithm == "lsgd":
        assert resumed.leader_counts == whole.leader_counts  # the coordinator's history came back too
    assert len(list_checkpoints(whole.output_dir)) == 3  # steps 24, 16, 8: keep_checkpoints=3


def test_resume_refuses_other_settings(local_ray, tmp_path):
    first = run(tmp_path, "first", max_steps=8)
    with pytest.raises(ConfigError, match="seed: 3 then, 4 now"):
        run(tmp_path, "other", max_steps=16, seed=4, resume=first.output_dir)


def test_async_checkpoints_and_resume(local_ray, tmp_path):
    lsgd = LSGDConfig(mode="async", tau=4, tau_global=8)
    first = run(tmp_path, "first", max_steps=40, lsgd=lsgd, checkpoint_every_steps=None, checkpoint_every_s=0.5)
    assert first.checkpoints, "an asynchronous run writes checkpoints too"
    resumed = run(tmp_path, "first", max_steps=80, lsgd=lsgd, resume=first.output_dir, checkpoint_every_s=0.5)
    assert resumed.status == "completed" and resumed.steps_per_worker == 80
    assert [w["steps"] for w in final_workers(resumed)] == [80] * 4


def test_the_driver_killed_then_resumed(local_ray, tmp_path):
    """A real driver process killed with SIGKILL after its first checkpoint; ``--resume``
    continues from that checkpoint to the full step count."""
    out = tmp_path / "killed"
    args = [
        sys.executable,
        "-m",
        "lsgd_ray",
        "train",
        "--address",
        local_ray,
        "--groups",
        "2",
        "--workers-per-group",
        "1",
        "--max-steps",
        "3000",
        "--checkpoint-every",
        "50",
        "--eval-every",
        "1000",
        "--quiet",
        "--output-dir",
        str(out),
    ]
    driver = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not list_checkpoints(out) and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert list_checkpoints(out), (
        driver.stderr.read().decode()[-2000:] if driver.poll() is not None else "no checkpoint"
    )
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    step = json.loads((list_checkpoints(out)[0] / "meta.json").read_text())["steps_per_worker"]
    assert 0 < step < 3000
    done = subprocess.run([*args, "--resume", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["steps_per_worker"] == 3000
    assert result["resumed_from"].startswith(str(out / "checkpoints"))
