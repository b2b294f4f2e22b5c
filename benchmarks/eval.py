"""Tables 3-5 for 6 models x 22,425 test images x 14 findings: cxrdx vs the paper's code pattern.

    .venv/bin/python benchmarks/eval.py [--images 22425] [--models 6] [--paper-models 1] [--figure]

cxrdx: `metrics.compare_models` + `report.comparison_tables`: per-finding AUROC with DeLong CIs,
threshold metrics, mean ± SE (CI), Pearson r, paired DeLong tests between all models, RM-ANOVA with
Bonferroni pairwise tests and the Table 5 matrices of every model.
Paper pattern: predictions collected by concatenating one DataFrame per image, then scikit-learn's
roc_auc_score per finding (AUROCs only: no CIs, no tests). It is timed on `--paper-models` models and
scaled to `--models` (every model costs the same).
Synthetic predictions; positives at the findings' ratios in the paper's test split.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from cxrdx import metrics, report
from cxrdx.findings import FINDINGS

# positive ratio of each finding in the paper's test split (22,425 images, Data_Entry_2017_v2020)
RATIOS = np.array([0.1035, 0.0268, 0.0421, 0.0194, 0.1160, 0.0209, 0.0132, 0.0016, 0.1806, 0.0536, 0.0581, 0.0297, 0.0136, 0.0469])


def synthetic(images: int, models: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    y = (rng.random((images, len(FINDINGS))) < RATIOS).astype(np.uint8)
    signal = rng.normal(size=y.shape) + 1.2 * y
    probs = {}
    for m in range(models):
        logits = signal * (0.8 + 0.1 * m) + rng.normal(size=y.shape) - 2
        probs[f"model_{m}"] = np.round(1 / (1 + np.exp(-logits)), 6)  # rounded: ties as in float32 outputs
    return y, probs


def cxrdx_tables(y: np.ndarray, probs: dict[str, np.ndarray]) -> list[report.Table]:
    cmp = metrics.compare_models(y, probs)
    return report.comparison_tables(cmp)


def paper_pattern(y: np.ndarray, probs: np.ndarray) -> list[float]:
    """One DataFrame concatenated per image, then scikit-learn per finding."""
    results = pd.DataFrame()
    for i in range(len(y)):
        row = {"Image Index": f"{i:08d}_000.png"}
        row |= {f"{f}_prob": probs[i, k] for k, f in enumerate(FINDINGS)}
        row |= {f"{f}_label": y[i, k] for k, f in enumerate(FINDINGS)}
        results = pd.concat([results, pd.DataFrame([row])], ignore_index=True)
    return [roc_auc_score(results[f"{f}_label"].astype(int), results[f"{f}_prob"]) for f in FINDINGS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=22425)
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--paper-models", type=int, default=1, help="models to time the paper pattern on (scaled to --models)")
    parser.add_argument("--figure", action="store_true", help="also time the combined ROC figure")
    args = parser.parse_args()

    y, probs = synthetic(args.images, args.models)
    with warnings.catch_warnings():  # warm the imports (statsmodels, scipy) on a slice
        warnings.simplefilter("ignore", metrics.MetricWarning)
        cxrdx_tables(y[:500], {k: v[:500] for k, v in probs.items()})
    start = time.perf_counter()
    tables = cxrdx_tables(y, probs)
    ours = time.perf_counter() - start

    start = time.perf_counter()
    for name in list(probs)[: args.paper_models]:
        paper_aucs = paper_pattern(y, probs[name])
    paper = (time.perf_counter() - start) / args.paper_models * args.models
    assert np.allclose(paper_aucs, metrics.compare_models(y, {"m": probs[name]}).auc[0])

    print(f"{args.models} models x {args.images} images x {len(FINDINGS)} findings (synthetic)")
    print(f"  cxrdx  Tables 3-5 with DeLong CIs, DeLong tests, RM-ANOVA, Bonferroni ({len(tables)} tables): {ours:8.2f} s")
    print(f"  paper  per-image DataFrame concat + sklearn AUROC only (timed on {args.paper_models} model(s)): {paper:8.2f} s")
    print(f"  ratio  {paper / ours:.0f}x")
    if args.figure:
        import tempfile
        from pathlib import Path

        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report.roc_figure(y, probs, FINDINGS, Path(tmp) / "roc.png")
        print(f"  cxrdx  combined ROC figure ({args.models} curves x {len(FINDINGS)} panels): {time.perf_counter() - start:8.2f} s")


if __name__ == "__main__":
    main()
