"""The input guard's content check of a checkpoint: held-out images accepted, foreign images refused.

    .venv/bin/python benchmarks/guard.py --checkpoint RUN/checkpoints/best.pt [--cache DIR] [--split-file FILE]

Held out: the test split of the cache the model was trained on (default: the one its config names,
with RUN/split.csv). Foreign: scikit-image's packaged photographs and micrographs (`skimage/data/`)
and generated text, blank and noise images (tests/helpers.py), at the cache's image size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from cxrdx.data.cache import open_cache
from cxrdx.data.dataset import rows_for_split
from cxrdx.data.splits import read_split
from cxrdx.predict import Predictor
from cxrdx.rundir import run_dir_of, split_path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the foreign test images live with the tests
from helpers import foreign_images

KINDS = ("skimage", "text", "blank", "noise")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--cache", help="default: the cache named in the checkpoint's config")
    parser.add_argument("--split-file", help="default: RUN/split.csv beside the checkpoint")
    args = parser.parse_args()
    predictor = Predictor.from_checkpoint(args.checkpoint, device="cpu")
    print(f"guard {predictor.guard_status}")
    if predictor.guard is None:
        return
    cache = open_cache(args.cache or predictor.checkpoint.config["data"]["cache"])
    split = read_split(args.split_file or split_path(run_dir_of(args.checkpoint)))
    held_out = predictor.predict(np.asarray(cache.images[rows_for_split(cache, split, "test")]))
    accepted = np.mean([p.accepted for p in held_out])
    print(f"held-out test images accepted: {accepted:.1%} of {len(held_out)}")
    foreign = foreign_images(predictor.info.image_size)
    judged = predictor.predict(list(foreign.values()), names=list(foreign))
    print(f"foreign images refused: {np.mean([not p.accepted for p in judged]):.1%} of {len(judged)}")
    for kind in KINDS:
        some = [p for p in judged if p.name.startswith(kind)]
        kept = [p.name for p in some if p.accepted]
        print(f"  {kind}: {len(some) - len(kept)} of {len(some)} refused" + (f" (accepted: {', '.join(kept)})" if kept else ""))
    scores = lambda ps: np.array([p.ood_score for p in ps])
    print(
        f"OOD score median: held out {np.median(scores(held_out)):.3g}, foreign {np.median(scores(judged)):.3g}, "
        f"threshold {predictor.guard.threshold:.3g}"
    )


if __name__ == "__main__":
    main()
