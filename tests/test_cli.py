"""The command line as a user runs it: a real process with its own embedded Ray."""

import json
import os
import subprocess
import sys

import pytest

from lsgd_ray.cli import build_parser, config_from_args, main


def run_cli(*args, timeout=240, cwd=None, **env_extra):
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "lsgd_ray", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


@pytest.mark.timeout(300)
def test_main_job_trains_and_reports(tmp_path):
    out = tmp_path / "run"
    # A cluster address left behind by an earlier `ray start` must not stop the embedded Ray.
    proc = run_cli(
        "--dataset",
        "synthetic",
        "--epochs",
        "4",
        "--eval-every",
        "0.5",
        "--output-dir",
        str(out),
        RAY_ADDRESS="127.0.0.1:1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 group(s) x [2, 2] worker(s)" in proc.stdout
    assert "[step" in proc.stdout  # progress lines
    assert "leader (worker" in proc.stdout and "test accuracy" in proc.stdout
    assert str(out / "result.json") in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["final_test_accuracy"] > 0.6
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--lam", "1.5"], "lam (local pulling strength λ) must be in [0, 1]"),
        (["--tau", "0"], "tau (local communication period τ, in steps) must be a positive integer"),
        (["--dataset", "mnist"], "needs a data directory"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent"], "MNIST not found: /nonexistent/MNIST/raw"),
    ],
)
def test_bad_input_exits_with_a_message_before_any_actor(args, message, capsys):
    code = main(args)
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_names_list_the_valid_ones(capsys):
    with pytest.raises(SystemExit):
        main(["--dataset", "imagenet9"])
    err = capsys.readouterr().err
    assert "invalid choice: 'imagenet9'" in err and "digits" in err


def test_defaults_are_the_offline_main_job():
    args = build_parser().parse_args(["train"])
    cfg = config_from_args(args)
    assert (cfg.num_groups, cfg.workers_per_group) == (2, 2)
    assert args.dataset == "digits" and cfg.batch_size == 32 and cfg.epochs == 50.0
    assert cfg.optimizer.nesterov and cfg.lsgd.mode == "sync"


def test_download_offline_fails_clearly(tmp_path, capsys):
    code = main(["download", "mnist", "--data-dir", str(tmp_path)])
    assert code == 1
    assert "could not download mnist" in capsys.readouterr().err


def test_peer_flags_reach_their_configs():
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["train", "--algorithm", "aldsgd", "--graph", "torus", "--c1", "0.2", "--tau", "2"]))
    assert cfg.algorithm == "aldsgd" and cfg.mode == "sync"
    assert (cfg.gossip.graph, cfg.gossip.c1, cfg.gossip.tau, cfg.gossip.rotation) == ("torus", 0.2, 2, "matchings")
    assert config_from_args(parse(["train", "--algorithm", "dpsgd"])).gossip.tau == 1  # gossip's own default
    cfg = config_from_args(parse(["train", "--algorithm", "easgd", "--mode", "async", "--beta", "0.5"]))
    assert cfg.mode == "async" and cfg.easgd.beta == 0.5 and cfg.easgd.moving_rate(4) == 0.125
    cfg = config_from_args(parse(["train", "--algorithm", "downpour"]))
    assert cfg.mode == "async" and cfg.downpour.rule == "mean" and not cfg.stop_on_divergence
    cfg = config_from_args(
        parse(["train", "--algorithm", "downpour", "--downpour-rule", "sum", "--stop-on-divergence"])
    )
    assert cfg.downpour.rule == "sum" and cfg.stop_on_divergence
    cfg = config_from_args(parse(["train", "--algorithm", "local_sgd", "--tau", "8", "--tau-global", "32"]))
    assert (cfg.local_sgd.tau, cfg.local_sgd.tau_global) == (8, 32)


def test_evaluate_flag_picks_the_lsgd_model_behind_test_accuracy():
    parse = build_parser().parse_args
    assert config_from_args(parse(["train"])).lsgd.evaluate == "leader"
    assert config_from_args(parse(["train", "--evaluate", "center"])).lsgd.evaluate == "center"


@pytest.mark.timeout(300)
def test_cifar10_files_train_cnn7_with_the_reference_augmentation(tmp_path):
    """CIFAR-10 batches in the original format, read by the real loader inside the workers, 28x28
    random crops + flips for training, center crops for the evaluator."""
    from tests.test_models_data import write_cifar

    write_cifar(tmp_path / "data", per_batch=40)
    out = tmp_path / "run"
    proc = run_cli(
        *("--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--model", "cnn7"),
        *("--groups", "1", "--workers-per-group", "2", "--batch-size", "16", "--max-steps", "8"),
        *("--algorithm", "easgd", "--tau", "4", "--output-dir", str(out), "--quiet"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "completed" and result["steps_per_worker"] == 8
    assert result["communication"]["weight_bytes"] == 351_946 * 4  # cnn7 on 28x28 crops
    assert result["final_test_accuracy"] is not None


def test_setup_finds_an_installed_venv_complete_and_installs_nothing():
    """`scripts/setup.sh`, which `run.sh` and `test.sh` call first, looks each dependency up
    without importing it; on the installed `.venv` it installs nothing, and a missing package
    would make it reinstall (its check exits non-zero)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv_python = os.path.join(root, ".venv", "bin", "python")
    if os.path.realpath(sys.prefix) != os.path.realpath(os.path.join(root, ".venv")):
        pytest.skip("the tests run outside the project's .venv")
    done = subprocess.run(["bash", os.path.join(root, "scripts", "setup.sh")], capture_output=True, text=True)
    assert done.returncode == 0 and "installing" not in done.stderr, done.stderr
    with open(os.path.join(root, "scripts", "setup.sh")) as f:
        script = f.read()
    check = script.split("FIND_ALL='", 1)[1].split("'\n", 1)[0]
    assert subprocess.run([venv_python, "-c", check]).returncode == 0
    missing = check.replace('"lsgd_ray ', '"lsgd_ray no_such_package_here ')
    assert missing != check and subprocess.run([venv_python, "-c", missing]).returncode == 1
