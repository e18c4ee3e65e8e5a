"""A classic check: MNIST-bags in the manner of Ilse et al. 2018, built from scikit-learn's digits.

    .venv/bin/python scripts/bench/bench_mnist_bags.py [--seeds 0 1 2] [--models abmil] [--w2s]

A bag holds a Gaussian number of 8x8 digit images (mean 10, std 2, at least 2); it is positive when
it holds a 9. Instances are the 64 pixel values / 16. Training bags (200) and validation bags (50)
are drawn from one half of the digits, the 1,000 test bags from the other half, so no test image
was seen in training. Reported: test bag AUC (target for ABMIL: >= 0.95) and instance AUC of
finding the 9s.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def make_bags(images, digits, n_bags: int, rng, prefix: str, mean: float = 10, std: float = 2):
    import numpy as np

    from mil.cohort import Bag

    bags = []
    for i in range(n_bags):
        n = max(2, int(round(rng.normal(mean, std))))
        idx = rng.choice(len(images), n, replace=False)
        nines = (digits[idx] == 9).astype(np.float32)
        bags.append(Bag(slide_id=f"{prefix}{i:04d}", patient_id=f"{prefix}{i:04d}", label=int(nines.any()),
                        features=images[idx].astype(np.float32), coords=np.zeros((n, 2), np.int64),
                        instance_labels=nines))
    return bags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", default=["abmil"])
    p.add_argument("--train-bags", type=int, default=200)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--w2s", action="store_true", help="also run each model with the correction")
    a = p.parse_args()

    import numpy as np
    from sklearn.datasets import load_digits

    from mil.cohort import Cohort
    from mil.metrics import bag_metrics
    from mil.splits import Split
    from mil.train import TrainConfig, train_fold
    from mil.w2s import W2SConfig

    digits = load_digits()
    x, d = digits.data / 16.0, digits.target
    print(f"digits: {len(x)} images, {np.mean(d == 9):.1%} nines; {a.train_bags} training bags, 50 validation, "
          "1000 test")
    for model in a.models:
        for w2s in ([False, True] if a.w2s else [False]):
            aucs, inst = [], []
            t0 = time.perf_counter()
            for seed in a.seeds:
                rng = np.random.default_rng(seed)
                perm = rng.permutation(len(x))
                tr, te = perm[: len(x) // 2], perm[len(x) // 2:]
                bags = (make_bags(x[tr], d[tr], a.train_bags + 50, rng, "train")
                        + make_bags(x[te], d[te], 1000, rng, "test"))
                cohort = Cohort(bags=bags, class_names=["no 9", "has 9"], positive_class="has 9",
                                encoder="digits-8x8", source="sklearn.datasets.load_digits")
                n_tr = a.train_bags
                split = Split(fold=0, train=list(range(n_tr)), val=list(range(n_tr, n_tr + 50)),
                              test=list(range(n_tr + 50, len(bags))))
                cfg = TrainConfig(model=model, epochs=a.epochs, batch_size=4, lr=5e-4, patience=15, seed=seed,
                                  device="cpu", w2s=W2SConfig(enabled=w2s))
                _, res = train_fold(cohort, split, cfg, progress=False)
                aucs.append(bag_metrics(np.array(res.test_labels), np.array(res.test_probs))["auc"])
                inst.append(res.instance["student"]["auc"] if res.instance["student"] else float("nan"))
            print(f"{model:9s} w2s={'yes' if w2s else 'no ':3s} test bag AUC {np.mean(aucs):.3f} ± {np.std(aucs):.3f} "
                  f"(seeds: {', '.join(f'{v:.3f}' for v in aucs)}); instance AUC (9s) {np.nanmean(inst):.3f}; "
                  f"{(time.perf_counter() - t0) / len(a.seeds):.0f} s per seed")


if __name__ == "__main__":
    main()
