"""The GPU path, checked on a machine with one CUDA GPU: what the CPU-only suite cannot run.

1. A pull on a GPU worker costs one host-to-device copy of the leader (float32 and bfloat16),
   counted by torch's profiler on a Worker made in this process.
2. Short runs on a local Ray with ``gpus_per_worker`` below 1 (several workers share the GPU):
   LSGD sync and async, EASGD, local SGD, DiLoCo, and data-parallel over gloo with CUDA tensors;
   with ``gpus_per_worker=1``, data-parallel and data-parallel + PowerSGD over NCCL.

Each row says whether the run completed above chance, on which device its workers trained, and
its wall time. Exits 1 if any check fails. Run: ``python scripts/gpu_check.py`` (``--out F``
writes the rows as JSON). It needs the package's imports (Ray, torch, torchvision) and nothing
else; on a GPU machine without internet, unpack a Ray wheel for its Python somewhere and put that
and this checkout on ``PYTHONPATH`` (how it was run on an H200: docs/benchmarks.md, "GPU").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import traceback

import numpy as np
import ray
import torch

from lsgd_ray import DataParallelConfig, LSGDConfig, OptimizerConfig, TrainConfig, Trainer
from lsgd_ray._internal.protocol import WorkerSpec
from lsgd_ray._internal.worker import Worker
from lsgd_ray.data import synthetic
from lsgd_ray.models import mlp

MODEL = functools.partial(mlp, (16,), 4, hidden=256)
DATA = functools.partial(synthetic, n_train=4096, n_test=1024)


def copies_per_pull(comm_dtype: str, pulls: int = 20) -> dict[str, float]:
    """Host-to-device and device-to-host copies per pull, from the profiler's CUDA memcpy events."""
    spec = WorkerSpec(
        num_workers=2, batch_size=32, seed=0, lsgd=LSGDConfig(), optimizer=OptimizerConfig(), gpus=0.25,
        comm_dtype=comm_dtype,
    )  # fmt: skip
    worker = Worker(1, 0, 1, MODEL, DATA, spec)
    leader = Worker(0, 0, 0, MODEL, DATA, spec).get_weights()  # as it travels: float32 or int16 bits
    worker.pull(leader, 0.1)  # warm-up: allocator, kernels
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(pulls):
            worker.pull(leader, 0.1)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    h2d = sum("HtoD" in n for n in names)
    d2h = sum("DtoH" in n for n in names)
    return {"htod_per_pull": h2d / pulls, "dtoh_per_pull": d2h / pulls, "leader_bytes": int(leader.nbytes)}


def run(name: str, algorithm: str, gpus: float, groups: int, per_group: int, out_dir: str, **extra) -> dict:
    cfg = TrainConfig(
        algorithm=algorithm, num_groups=groups, workers_per_group=per_group, gpus_per_worker=gpus,
        cpus_per_worker=1.0, batch_size=64, epochs=6, eval_every_s=2.0, quiet=True,
        output_dir=os.path.join(out_dir, name), **extra,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        with Trainer(MODEL, DATA, cfg) as trainer:
            result = trainer.fit()
    except Exception as error:  # noqa: BLE001 - a check reports its failure and the others go on
        return {"name": name, "ok": False, "error": f"{type(error).__name__}: {error}", "trace": traceback.format_exc()}
    wall = time.perf_counter() - start
    devices = sorted({str(w["device"]) for g in result.topology for w in g["workers"]})
    accuracy = result.final_test_accuracy or 0.0
    ok = result.status == "completed" and accuracy > 0.5 and devices == ["cuda"]  # 4 classes: chance 0.25
    return {
        "name": name, "ok": ok, "status": result.status, "accuracy": round(accuracy, 4), "devices": devices,
        "workers": groups * per_group, "gpus_per_worker": gpus, "wall_s": round(wall, 1),
        "steps_per_worker": result.steps_per_worker, "error": result.error,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; run this on a machine with one", file=sys.stderr)
        return 2
    print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, ray {ray.__version__}", flush=True)
    rows: list[dict] = []
    for dtype in ("float32", "bfloat16"):
        counts = copies_per_pull(dtype)
        ok = counts["htod_per_pull"] == 1.0
        rows.append({"name": f"pull copies ({dtype})", "ok": ok, **counts})
        print(f"  pull ({dtype}): {counts}", flush=True)
    ray.init(num_cpus=16, num_gpus=1, include_dashboard=False, logging_level="WARNING")
    quarter = dict(gpus=0.25, groups=2, per_group=2)
    cases = [
        ("lsgd sync, 4 workers x 0.25 GPU", "lsgd", quarter, {}),
        ("lsgd bf16 sync, 4 x 0.25", "lsgd", quarter, {"comm_dtype": "bfloat16"}),
        ("lsgd async, 4 x 0.25", "lsgd", quarter, {"lsgd": LSGDConfig(mode="async")}),
        ("easgd, 4 x 0.25", "easgd", quarter, {}),
        ("local_sgd, 4 x 0.25", "local_sgd", quarter, {}),
        ("diloco, 4 x 0.25", "diloco", quarter, {}),
        ("data_parallel gloo/CUDA, 2 x 0.5", "data_parallel", dict(gpus=0.5, groups=1, per_group=2), {}),
        ("data_parallel nccl, 1 x 1", "data_parallel", dict(gpus=1.0, groups=1, per_group=1), {}),
        (
            "data_parallel powersgd nccl, 1 x 1",
            "data_parallel",
            dict(gpus=1.0, groups=1, per_group=1),
            {"data_parallel": DataParallelConfig(compression="powersgd")},
        ),
    ]
    with tempfile.TemporaryDirectory() as out_dir:
        for name, algorithm, layout, extra in cases:
            row = run(name, algorithm, out_dir=out_dir, **layout, **extra)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k != "trace"}
            print(f"  {'ok ' if row['ok'] else 'FAIL'} {shown}", flush=True)
            if not row["ok"] and "trace" in row:
                print(row["trace"], flush=True)
    ray.shutdown()
    failed = [r["name"] for r in rows if not r["ok"]]
    print(
        f"gpu_check: {len(rows) - len(failed)} of {len(rows)} checks passed" + (f"; failed: {failed}" if failed else "")
    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    sys.exit(main())
