"""`cxrdx demo`: the whole system on built-in phantoms, on a CPU, in minutes.

It runs the steps a user runs on the real dataset, through the library, printing first the `cxrdx`
command line that does the same: phantoms -> prepare -> split + Table 1 -> train (wbce and ours, same
budget) -> evaluate -> compare -> second-site phantoms (another scanner, csv layout) -> evaluate there
-> generalisation table -> explain (Group-CAM) -> localize -> report. No data and no internet needed.
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from cxrdx import rundir
from cxrdx.errors import CxrdxError

LOSSES = ("wbce", "ours")
RATIOS = (0.7, 0.1, 0.2)  # `cxrdx split`'s default
LOCALIZE_METHODS = ("groupcam", "gradcam")
SITE2, GENERALISATION = "site2", "generalisation"  # RUN/eval-site2 and RUN/generalisation/


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


@dataclass(frozen=True)
class Step:
    """One step of the demo: `run` does it with the library and returns a line on what it made;
    `args` is the `cxrdx` command line that does the same."""

    title: str
    args: list[Any]  # the command-line words; str() of each is printed
    run: Callable[[], str]


def steps(s: DemoSettings) -> list[Step]:
    """The demo's steps, in order."""
    data, cache, split = s.out / "phantoms", s.out / "cache", s.out / "split.csv"
    metadata = data / "Data_Entry_2017.csv"
    runs = {loss: s.out / "runs" / loss for loss in LOSSES}
    found = [
        Step(
            "synthetic dataset",
            ["phantoms", "--out", data, "--n", s.n, "--size", s.size, "--seed", s.seed, "--tail-floor", 0.03],
            lambda: _phantoms(s, data),
        ),
        Step(
            "preprocessing cache", ["prepare", "--data-dir", data, "--out", cache, "--size", s.size], lambda: _prepare(data, cache, s.size)
        ),
        Step(
            "patient-wise split",
            ["split", "--metadata", metadata, "--strategy", "patient", "--seed", s.seed, "--out", split],
            lambda: _split(metadata, split, s.seed),
        ),
        Step("Table 1", ["stats", "--metadata", metadata, "--split-file", split], lambda: _table1(metadata, split)),
    ]
    for loss, run in runs.items():
        overrides = [
            f"out={run}",
            f"name={loss}",
            f"loss.name={loss}",
            f"data.cache={cache}",
            f"data.split_file={split}",
            f"optim.epochs={s.epochs}",
            f"seed={s.seed}",
            f"data.input_size={s.input_size}",
        ]
        found.append(
            Step(
                f"train with L_{loss}",
                ["train", "--config", preset_path(), *[a for o in overrides for a in ("--set", o)]],
                partial(_train, overrides),
            )
        )
    for loss, run in runs.items():
        best, out = rundir.best_checkpoint(run), run / rundir.EVAL
        found.append(
            Step(
                f"evaluate L_{loss} on the test split",
                ["evaluate", "--checkpoint", best, "--split", "test", "--out", out],
                partial(_evaluate, best, out),
            )
        )
    evaluations = [run / rundir.EVAL for run in runs.values()]
    found.append(
        Step(
            "compare the losses (Tables 3-5)",
            ["compare", *evaluations, "--names", *LOSSES, "--out", s.out / "compare"],
            lambda: _compare(evaluations, s.out / "compare"),
        )
    )
    site2, cache2 = s.out / "site2", s.out / "cache-site2"
    found += [
        Step(
            "second site: other patients, another scanner (csv layout)",
            ["phantoms", "--site", 2, "--out", site2, "--n", s.n_site2, "--size", s.size, "--seed", s.seed, "--tail-floor", 0.03],
            lambda: _site2(s, site2),
        ),
        Step(
            "second site cache",
            ["prepare", "--dataset", "csv", "--data-dir", site2, "--out", cache2, "--size", s.size],
            lambda: _prepare(site2, cache2, s.size, dataset="generic"),
        ),
    ]
    for loss, run in runs.items():
        best, external = rundir.best_checkpoint(run), rundir.external_eval_dir(run, SITE2)
        found.append(
            Step(
                f"evaluate L_{loss} on the second site",
                ["evaluate", "--checkpoint", best, "--cache", cache2, "--out", external],
                partial(_evaluate, best, external, split="all", cache=cache2),
            )
        )
        found.append(
            Step(
                f"generalisation table (L_{loss})",
                ["compare", run / rundir.EVAL, "--external", external, "--names", "site1", SITE2, "--out", run / GENERALISATION],
                partial(_generalisation, run / rundir.EVAL, external, run / GENERALISATION),
            )
        )
    for loss, run in runs.items():
        best = rundir.best_checkpoint(run)
        found.append(
            Step(
                f"Group-CAM heatmaps (L_{loss})",
                [
                    "explain",
                    "--checkpoint",
                    best,
                    "--split",
                    "test",
                    "--limit",
                    s.explain_images,
                    "--predicted",
                    "--target-layer",
                    s.cam_layer,
                    "--out",
                    run / rundir.EXPLAIN,
                ],
                partial(_explain, s, best, run / rundir.EXPLAIN),
            )
        )
        found.append(
            Step(
                f"localization vs boxes (L_{loss})",
                [
                    "localize",
                    "--checkpoint",
                    best,
                    "--boxes",
                    data / "BBox_List_2017.csv",
                    "--split",
                    "test",
                    "--limit",
                    s.localize_images,
                    "--methods",
                    *LOCALIZE_METHODS,
                    "--target-layer",
                    s.cam_layer,
                    "--out",
                    run / rundir.LOCALIZE,
                ],
                partial(_localize, s, best, data / "BBox_List_2017.csv", run / rundir.LOCALIZE),
            )
        )
    found.append(
        Step(
            "HTML report",
            ["report", *runs.values(), "--names", *LOSSES, "--out", s.out / "report"],
            lambda: _report(list(runs.values()), s.out / "report"),
        )
    )
    return [Step(step.title, [str(a) for a in step.args], step.run) for step in found]


def _phantoms(s: DemoSettings, out: Path) -> str:
    from cxrdx.data.phantoms import generate_phantoms

    generate_phantoms(out, n=s.n, size=s.size, seed=s.seed, tail_floor=0.03)
    return f"wrote {s.n} phantom images ({s.size}x{s.size}) to {out}"


def _site2(s: DemoSettings, out: Path) -> str:
    from cxrdx.data.phantoms import generate_second_site

    generate_second_site(out, n=s.n_site2, size=s.size, seed=s.seed, tail_floor=0.03)
    return f"wrote {s.n_site2} second-site phantom images ({s.size}x{s.size}) and labels.csv to {out}"


def _prepare(data: Path, cache: Path, size: int, dataset: str | None = None) -> str:
    from cxrdx.data.cache import prepare_cache

    result = prepare_cache(data, cache, size=size, dataset=dataset)
    if result.failed:
        name, reason = result.failed[0]
        raise CxrdxError(f"{len(result.failed)} phantom image(s) failed to prepare (first: {name}: {reason})")
    return f"prepared {result.prepared} images at {size}x{size} px in {cache}"


def _split(metadata: Path, out: Path, seed: int) -> str:
    from cxrdx.data.metadata import read_metadata
    from cxrdx.data.splits import make_split, write_split

    write_split(make_split(read_metadata(metadata), "patient", RATIOS, seed), out)
    return f"wrote {out} (patient, seed {seed})"


def _table1(metadata: Path, split: Path) -> str:
    from cxrdx.data.metadata import read_metadata
    from cxrdx.data.splits import format_table1, read_split, table1

    index = read_metadata(metadata)
    return format_table1(table1(index, read_split(split, index)), "md").rstrip()


def _train(overrides: list[str]) -> str:
    from cxrdx.config import load_config
    from cxrdx.engine import train

    return str(train(load_config(preset_path(), overrides)))


def _evaluate(checkpoint: Path, out: Path, split: str = "test", cache: Path | None = None) -> str:
    from cxrdx.evaluation import evaluate_checkpoint
    from cxrdx.report import format_mean_ci

    result = evaluate_checkpoint(checkpoint, out, split, cache=cache)
    if result is None:  # only under torchrun, on ranks other than 0: the demo runs in one process
        raise CxrdxError("the demo runs in one process, not under torchrun")
    return f"{result['settings']['images']} images; mean AUROC {format_mean_ci(result['overall']['auroc'])}"


def _compare(evaluations: list[Path], out: Path) -> str:
    from cxrdx.evaluation import compare_runs
    from cxrdx.report import markdown

    _, tables = compare_runs(evaluations, list(LOSSES), out=out)
    return "\n".join(markdown(t) for t in tables).rstrip()


def _generalisation(internal: Path, external: Path, out: Path) -> str:
    from cxrdx.external import compare_external
    from cxrdx.report import markdown

    _, table = compare_external(internal, [external], ["site1", SITE2], out)
    return markdown(table).rstrip()


def _explain(s: DemoSettings, checkpoint: Path, out: Path) -> str:
    from cxrdx.explain.render import write_explanations
    from cxrdx.explain.runs import cam_predictor, explain_inputs

    predictor, layers = cam_predictor(checkpoint, target_layer=s.cam_layer)
    count, items = explain_inputs(predictor, checkpoint, split="test", limit=s.explain_images)
    table = write_explanations(predictor, items, out, how="predicted", target_layers=layers, total=count)
    return f"{len(table)} map(s) of {count} image(s) written to {out}"


def _localize(s: DemoSettings, checkpoint: Path, boxes: Path, out: Path) -> str:
    from cxrdx.explain.runs import cam_predictor, localize_checkpoint

    predictor, layers = cam_predictor(checkpoint, target_layer=s.cam_layer)
    result = localize_checkpoint(predictor, checkpoint, boxes, LOCALIZE_METHODS, layers, split="test", limit=s.localize_images, out=out)
    return result.text.rstrip()


def _report(runs: list[Path], out: Path) -> str:
    import json

    from cxrdx.report import SUMMARY, headline, write_report

    path = write_report(runs, out, list(LOSSES))
    return headline(json.loads((path.parent / SUMMARY).read_text(encoding="utf-8")))


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
        external = rundir.external_eval_dir(run, SITE2)
        if (external / rundir.PREDICTIONS).is_file():
            from cxrdx.external import compare_external, mean_difference

            g, _ = compare_external(run / rundir.EVAL, [external], ["site1", SITE2])
            site2, diff = mean_difference(g)
            text += f"; second site {site2:.3f} ({diff:+.3f} over the findings scored on both)"
        lines.append(text)
    return lines


def run_demo(settings: DemoSettings) -> Path:
    """Run every step, stopping at the first failure; return the report's path."""
    if (settings.out / "runs").exists():
        raise CxrdxError(f"{settings.out}: holds an earlier demo; remove it or pass --out OTHER_DIR")
    todo = steps(settings)
    started = time.perf_counter()
    for number, step in enumerate(todo, 1):
        print(f"\n[{number}/{len(todo)}] {step.title}: cxrdx {shlex.join(step.args)}", flush=True)
        step_start = time.perf_counter()
        print(step.run(), flush=True)
        print(f"[{number}/{len(todo)}] done in {time.perf_counter() - step_start:.0f} s", flush=True)
    minutes = (time.perf_counter() - started) / 60
    report = settings.out / "report" / "report.html"
    print(f"\ncxrdx demo finished in {minutes:.1f} min")
    for line in headline(settings):
        print(line)
    print(f"report: {report}")
    return report
