"""Hyperparameter search on the cluster against the same search in one process.

    python benchmarks/ml_tune.py [--trials 1000] [--max-t 27]

Softmax regression on scikit-learn's digits; lr, batch size and L2 drawn from a
space; ASHA stops poor trials.  The same search runs twice, each in its own
subprocess one after the other: on a 2-worker cluster and with
``daskray.init(local_mode=True)`` (every trial in the one process).  Prints both
wall times, their ratio, and the best validation loss of each (the same seeds
give the same trials, so they should agree).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def run(mode: str, trials: int, max_t: int) -> dict:
    import daskray
    from sklearn.datasets import load_digits

    from daskray.ml import Dataset, Trainer, TuneConfig, models, tune

    daskray.init(num_workers=2, local_mode=(mode == "local"))
    try:
        digits = load_digits()
        data = Dataset.from_numpy(digits.data, digits.target, num_shards=4, seed=0)
        train, valid = data.train_test_split(test_size=0.2, seed=0)
        train, stats = train.standardize()
        valid, _ = valid.standardize(stats)
        start = time.perf_counter()
        best = Trainer(
            config=TuneConfig(metric="loss", mode="min", num_samples=trials, seed=0,
                              scheduler=tune.ASHAScheduler(max_t=max_t)),
            model=models.SoftmaxRegression,
            train_config={"epochs": max_t, "optimizer": "sgd"},
            param_space={"lr": tune.loguniform(1e-3, 1.0),
                         "batch_size": tune.choice([32, 64, 128, 256]),
                         "l2": tune.loguniform(1e-5, 1e-1)},
        ).fit(train, valid=valid)
        elapsed = time.perf_counter() - start
        return {"mode": mode, "seconds": round(elapsed, 2), "trials": len(best.grid),
                "best_valid_loss": best.metrics["valid_loss"],
                "best_valid_accuracy": best.metrics["valid_accuracy"]}
    finally:
        daskray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--max-t", type=int, default=27)
    parser.add_argument("--mode", choices=["cluster", "local"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.trials, args.max_t)))
        return
    rows = {}
    for mode in ("local", "cluster"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--trials",
                              str(args.trials), "--max-t", str(args.max_t)],
                             capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            print(f"{mode}: ERROR\n{out.stderr[-2000:]}")
            continue
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        print(rows[mode], flush=True)
    if len(rows) == 2:
        ratio = rows["cluster"]["seconds"] / rows["local"]["seconds"]
        verdict = "PASS" if ratio < 1 else "FAIL"
        print(f"cluster / one process = {ratio:.2f}x  (target: < 1x) {verdict}")


if __name__ == "__main__":
    main()
