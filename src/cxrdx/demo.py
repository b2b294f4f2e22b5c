"""`cxrdx demo`: the whole system on built-in phantoms, on a CPU, in minutes.

It runs the same `cxrdx` commands a user runs on the real dataset, printing each one first:
phantoms -> prepare -> split + Table 1 -> train (wbce and ours, same budget) -> evaluate ->
compare -> second-site phantoms (another scanner, csv layout) -> evaluate there -> generalisation
table -> explain (Group-CAM) -> localize -> report. No data and no internet needed.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cxrdx import rundir
from cxrdx.errors import CxrdxError

LOSSES = ("wbce", "ours")


@dataclass(frozen=True)
class DemoSettings:
    out: Path = Path("demo-out")
    n: int = 2000  # phantom images
    n_site2: int = 600  # second-site phantoms: the external test set
    size: int = 128  # phantom and cache side, pixels
    input_size: int = 128  # model input side: a 4 x 4 last feature map, fine enough for the pointing game
    epochs: int = 12
    seed: int = 0
    explain_images: int = 8
    localize_images: int = 100
    # The preset's test_resnet has a 4 x 4 last stage at 128 px, too coarse to point inside a box;
    # its stride-16 stage gives 8 x 8 maps (measured: pointing game 0.45 vs 0.34 over all findings).
    cam_layer: str = "layer3"


def preset_path() -> Path:
    """The packaged training preset the demo starts from (a small model that learns phantoms on a CPU)."""
    return Path(str(resources.files("cxrdx") / "presets" / "demo.yaml"))


def commands(s: DemoSettings) -> list[tuple[str, list[str]]]:
    """The demo's steps: (title, cxrdx arguments)."""
    data, cache, split = s.out / "phantoms", s.out / "cache", s.out / "split.csv"
    runs = {loss: s.out / "runs" / loss for loss in LOSSES}
    steps: list[tuple[str, list[str]]] = [
        ("synthetic dataset", ["phantoms", "--out", data, "--n", s.n, "--size", s.size, "--seed", s.seed, "--tail-floor", 0.03]),
        ("preprocessing cache", ["prepare", "--data-dir", data, "--out", cache, "--size", s.size]),
        ("patient-wise split", ["split", "--metadata", data / "Data_Entry_2017.csv", "--strategy", "patient", "--seed", s.seed, "--out", split]),
        ("Table 1", ["stats", "--metadata", data / "Data_Entry_2017.csv", "--split-file", split]),
    ]
    for loss, run in runs.items():
        overrides = [f"out={run}", f"name={loss}", f"loss.name={loss}", f"data.cache={cache}", f"data.split_file={split}",
                     f"optim.epochs={s.epochs}", f"seed={s.seed}", f"data.input_size={s.input_size}"]
        steps.append((f"train with L_{loss}", ["train", "--config", preset_path(), *[a for o in overrides for a in ("--set", o)]]))
    for loss, run in runs.items():
        steps.append((f"evaluate L_{loss} on the test split", ["evaluate", "--checkpoint", rundir.best_checkpoint(run), "--split", "test", "--out", run / rundir.EVAL]))
    steps.append(("compare the losses (Tables 3-5)", ["compare", *[run / rundir.EVAL for run in runs.values()], "--names", *LOSSES, "--out", s.out / "compare"]))
    site2, cache2 = s.out / "site2", s.out / "cache-site2"
    steps += [
        ("second site: other patients, another scanner (csv layout)",
         ["phantoms", "--site", 2, "--out", site2, "--n", s.n_site2, "--size", s.size, "--seed", s.seed, "--tail-floor", 0.03]),
        ("second site cache", ["prepare", "--dataset", "csv", "--data-dir", site2, "--out", cache2, "--size", s.size]),
    ]
    for loss, run in runs.items():
        steps.append((f"evaluate L_{loss} on the second site", ["evaluate", "--checkpoint", rundir.best_checkpoint(run), "--cache", cache2, "--out", rundir.external_eval_dir(run, "site2")]))
        steps.append((f"generalisation table (L_{loss})", ["compare", run / rundir.EVAL, "--external", rundir.external_eval_dir(run, "site2"), "--names", "site1", "site2",
                                                          "--out", run / "generalisation"]))
    for loss, run in runs.items():
        best = rundir.best_checkpoint(run)
        steps.append((f"Group-CAM heatmaps (L_{loss})", ["explain", "--checkpoint", best, "--split", "test", "--limit", s.explain_images, "--predicted",
                                                      "--target-layer", s.cam_layer, "--out", run / rundir.EXPLAIN]))
        steps.append((f"localization vs boxes (L_{loss})", ["localize", "--checkpoint", best, "--boxes", data / "BBox_List_2017.csv", "--split", "test", "--limit", s.localize_images,
                                                     "--methods", "groupcam", "gradcam", "--target-layer", s.cam_layer, "--out", run / rundir.LOCALIZE]))
    steps.append(("HTML report", ["report", *runs.values(), "--names", *LOSSES, "--out", s.out / "report"]))
    return [(title, [str(a) for a in args]) for title, args in steps]


def headline(s: DemoSettings) -> list[str]:
    """One line per loss: mean test AUROC with its CI, and the Group-CAM pointing-game rate."""
    lines = []
    for loss in LOSSES:
        run = s.out / "runs" / loss
        auroc = rundir.read_eval_metrics(run / rundir.EVAL).overall["auroc"]
        text = f"L_{loss}: mean test AUROC {auroc['mean']:.3f} ± {auroc['se']:.3f} (95% CI {auroc['low']:.3f}-{auroc['high']:.3f})"
        if (run / rundir.LOCALIZE / rundir.LOCALIZATION).is_file():
            rates = rundir.read_localization(run / rundir.LOCALIZE).pointing_game()
            text += ", pointing game " + ", ".join(f"{m} {v:.2f}" for m, v in rates.items())
        table = run / "generalisation" / "generalisation.json"
        if table.is_file():
            mean = next(r for r in json.loads(table.read_text())["rows"] if r["finding"] == "Mean")
            text += f"; second site {mean['site2 AUROC']:.3f} ({mean['site2 - site1']:+.3f} over the findings scored on both)"
        lines.append(text)
    return lines


def run_demo(settings: DemoSettings, main: Callable[[list[str]], int]) -> Path:
    """Run every step through `main` (the CLI's entry point, which passes itself: nothing below the CLI
    imports it), stopping at the first failure; return the report's path."""
    if (settings.out / "runs").exists():
        raise CxrdxError(f"{settings.out}: holds an earlier demo; remove it or pass --out OTHER_DIR")
    steps = commands(settings)
    started = time.perf_counter()
    for number, (title, args) in enumerate(steps, 1):
        print(f"\n[{number}/{len(steps)}] {title}: cxrdx {shlex.join(args)}", flush=True)
        step_start = time.perf_counter()
        code = main(args)
        sys.stdout.flush()
        if code != 0:
            raise CxrdxError(f"step {number} ({title}) failed with exit code {code}")
        print(f"[{number}/{len(steps)}] done in {time.perf_counter() - step_start:.0f} s", flush=True)
    minutes = (time.perf_counter() - started) / 60
    report = settings.out / "report" / "report.html"
    print(f"\ncxrdx demo finished in {minutes:.1f} min")
    for line in headline(settings):
        print(line)
    print(f"report: {report}")
    return report
