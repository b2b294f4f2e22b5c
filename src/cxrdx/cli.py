"""The `cxrdx` command: one function pair per subcommand (arguments, handler) over the library."""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from cxrdx import __version__
from cxrdx.checks import check_nonnegative, check_output_dir, check_output_file, check_positive, check_range
from cxrdx.errors import CxrdxError, CxrdxWarning, ParameterError

if TYPE_CHECKING:  # the commands import what they use when they run: `cxrdx --help` stays fast
    from torch import nn

    from cxrdx.predict import Predictor

Handler = Callable[[argparse.Namespace], int]
FAILED = "FAILED"  # written into a run folder whose training stopped with an error: the error
DESCRIPTION = (
    "Multi-label chest X-ray diagnosis on ChestX-ray14: prepare the data, train, evaluate, compare, "
    "explain and serve models. 'cxrdx COMMAND --help' describes each command."
)


# --- argument values: checked while parsing, one line per mistake ----------------------------------
class _UsageError(Exception):
    """A command line argparse rejects; `main` prints it on one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse prints the usage and exits; one line and exit 2 instead
        raise _UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, unless its help already names it or it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def _value(kind: type, check: Callable[[float, str], None]) -> Callable[[str], float]:
    """An argparse type: `kind` (int or float) passing `check` (one of cxrdx.checks)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a{' whole' if kind is int else ''} number, got {text!r}") from None
        try:
            check(value, "")
        except CxrdxError as exc:
            raise argparse.ArgumentTypeError(str(exc).strip()) from None
        return value

    return parse


_POSITIVE_INT = _value(int, check_positive)
_COUNT = _value(int, check_nonnegative)  # zero allowed
_POSITIVE = _value(float, check_positive)
_NONNEGATIVE = _value(float, check_nonnegative)
_FRACTION = _value(float, lambda value, what: check_range(value, what, 0.0, 1.0))


# --- data: download, split, stats (cxrdx.data.download / splits / metadata) -------------------
def _download_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, help="dataset folder; the images land in TO/images/")
    parser.add_argument("--archives", help="which archives, e.g. 1-12, 3 or 1,4-6 (default: all of the links table)")
    parser.add_argument("--links", help="links table archive,url[,md5,size] (default: the packaged NIH table)")
    parser.add_argument("--keep-archives", action="store_true", help="keep each .tar.gz after unpacking it")


def _download(args: argparse.Namespace) -> int:
    from cxrdx.data.download import download, parse_archives, read_links

    check_output_dir(args.to, "--to")
    numbers = parse_archives(args.archives, len(read_links(args.links))) if args.archives else None
    results = download(args.to, numbers, links=args.links, keep_archives=args.keep_archives)
    for result in results:
        print(f"{result.name}: {result.files:,} files" + (" (unpacked by an earlier run)" if result.skipped else ""))
    print(f"{sum(r.files for r in results):,} files from {len(results)} archive(s) in {args.to}")
    return 0


def _metadata_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metadata", help="Data_Entry table, plain or .gz (default: the one in --data-dir, else NIH's table shipped with cxrdx)"
    )
    parser.add_argument("--data-dir", help="dataset folder holding a Data_Entry table")


def _metadata_path(args: argparse.Namespace) -> str:
    from cxrdx.data.metadata import find_metadata

    return args.metadata or str(find_metadata(args.data_dir))


def _split_args(parser: argparse.ArgumentParser) -> None:
    _metadata_args(parser)
    parser.add_argument(
        "--strategy",
        choices=("random", "patient", "official"),
        help="patient (default): no patient in two splits; random: image-level as the paper; "
        "official: NIH's train_val/test lists, val carved out by patient",
    )
    parser.add_argument(
        "--ratios",
        nargs=3,
        type=float,
        default=(0.7, 0.1, 0.2),
        metavar=("TRAIN", "VAL", "TEST"),
        help="image fractions (default: 0.7 0.1 0.2); official keeps NIH's test list and uses TRAIN:VAL",
    )
    parser.add_argument("--seed", type=_COUNT, default=0, help="random seed; the same seed gives the same split")
    parser.add_argument(
        "--lists", help="folder with train_val_list.txt and test_list.txt, plain or .gz (default: NIH's lists shipped with cxrdx)"
    )
    parser.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="import a split: 'paper' (the paper's exact split, shipped with cxrdx), a split CSV, "
        "or the paper's YAML lists (their folder or one file)",
    )
    parser.add_argument("--out", required=True, help="split file to write (CSV Image Index,split)")


def _split(args: argparse.Namespace) -> int:
    from cxrdx.data.metadata import read_metadata
    from cxrdx.data.splits import leakage_report, make_split, read_split, split_summary, write_split

    if args.from_file and args.strategy:
        raise CxrdxError("--from imports an existing split; leave out --strategy")
    check_output_file(args.out, "--out")
    metadata = _metadata_path(args)
    index = read_metadata(metadata)
    if args.from_file:
        split, how = read_split(args.from_file, index), f"imported from {args.from_file}"
    else:
        strategy = args.strategy or "patient"
        split = make_split(index, strategy, args.ratios, args.seed, lists_dir=args.lists)
        how = f"{strategy}, seed {args.seed}"
    write_split(split, args.out)
    print(f"wrote {args.out} ({how})")
    for name, row in split_summary(index, split).items():
        print(f"  {name:<5} {row['images']:>8,} images ({100 * row['fraction']:6.2f}%) {row['patients']:>7,} patients")
    if len(split) < len(index):
        print(f"  {len(index) - len(split):,} images of {metadata} are in no split")
    leak = leakage_report(index, split)
    print(
        f"leakage: {leak['val_images_with_train_patient']:,} val and {leak['test_images_with_train_patient']:,} "
        "test images belong to a patient who also has images in train"
    )
    return 0


def _stats_args(parser: argparse.ArgumentParser) -> None:
    _metadata_args(parser)
    parser.add_argument(
        "--split-file",
        help="split file (CSV Image Index,split, or the paper's YAML lists), or 'paper' for the paper's split shipped with cxrdx",
    )
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format")
    parser.add_argument("--pixels", action="store_true", help="print the pixel mean/std of a prepared cache instead")
    parser.add_argument("--cache", help="with --pixels: the cache folder made by 'cxrdx prepare'")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test"),
        default="train",
        help="with --pixels and --split-file: the split to measure (default: train)",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="with --pixels: measure the split's images that are in the cache, naming the others, instead of stopping",
    )


def _stats(args: argparse.Namespace) -> int:
    if args.pixels:
        return _pixel_stats(args)
    from cxrdx.data.metadata import read_metadata
    from cxrdx.data.splits import format_table1, read_split, table1

    if not args.split_file:
        raise CxrdxError("give --split-file S (or --pixels --cache C for pixel statistics)")
    index = read_metadata(_metadata_path(args))
    print(format_table1(table1(index, read_split(args.split_file, index)), args.format), end="")
    return 0


def _pixel_stats(args: argparse.Namespace) -> int:
    import json

    from cxrdx.data.cache import open_cache, pixel_stats

    if not args.cache:
        raise CxrdxError("--pixels needs --cache C (a folder made by 'cxrdx prepare')")
    cache = open_cache(args.cache)
    rows, which = None, "all images"
    if args.split_file:
        from cxrdx.data.dataset import rows_for_split
        from cxrdx.data.splits import read_split

        rows, which = rows_for_split(cache, read_split(args.split_file), args.split, args.allow_missing), f"{args.split} split"
    mean, std = pixel_stats(cache, rows=rows)
    images = len(cache.index) if rows is None else len(rows)
    if args.format == "json":
        print(json.dumps({"mean": mean, "std": std, "images": images}))
    else:
        print(f"mean {mean:.4f}  std {std:.4f}  ({images:,} images, {which} of {args.cache})")
    return 0


# --- images: prepare (cxrdx.data.cache) --------------------------------------------------------
def _prepare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", required=True, help="folder with the images (flat, images/ or images_0XX/images/)")
    parser.add_argument("--metadata", help="Data_Entry table (default: found in --data-dir)")
    parser.add_argument("--size", type=_POSITIVE_INT, default=256, help="side of the cached square images (default: 256)")
    parser.add_argument("--out", required=True, help="cache folder to create or to continue")
    parser.add_argument(
        "--workers",
        type=_COUNT,
        default=0,
        help="decoding processes (default: 0: in this process; about one per core for the full dataset)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _dataset_args(parser)


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        default="nih",
        help="layout of --data-dir: nih (default), chexpert, mimic, padchest, "
        "vindr, rsna or csv (your own labels.csv); labels harmonised to the 14 findings, docs/datasets.md",
    )
    parser.add_argument("--views", nargs="+", default=["PA", "AP"], help="view positions kept (default PA AP; 'all' keeps every view)")
    parser.add_argument(
        "--uncertain",
        choices=("ignore", "positive", "negative"),
        help="uncertain (-1) labels of chexpert, mimic and csv: ignore (not labelled, the default), positive or negative",
    )
    parser.add_argument(
        "--option",
        dest="options",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another option of the dataset's reader, e.g. readers=majority (vindr), labeller=negbio (mimic)",
    )


def _dataset_kwargs(args: argparse.Namespace) -> dict:
    """prepare_cache's dataset, views and adapter options from _dataset_args."""
    bad = [item for item in args.options if "=" not in item]
    if bad:
        raise CxrdxError(f"--option {bad[0]!r}: expected KEY=VALUE, e.g. readers=majority")
    options = dict(item.partition("=")[::2] for item in args.options)
    if args.uncertain:
        options["uncertain"] = args.uncertain
    views = None if [v.lower() for v in args.views] == ["all"] else tuple(v.upper() for v in args.views)
    return {"dataset": {"csv": "generic"}.get(args.dataset, args.dataset), "views": views, **options}


def _prepare(args: argparse.Namespace) -> int:
    from cxrdx.data.cache import prepare_cache

    check_output_dir(args.out, "--out")
    try:
        result = prepare_cache(
            args.data_dir,
            args.out,
            size=args.size,
            metadata=args.metadata,
            workers=args.workers,
            progress=not args.quiet,
            **_dataset_kwargs(args),
        )
    except KeyboardInterrupt:
        print("cxrdx prepare: stopped; run the same command again to continue where it stopped", file=sys.stderr)
        raise
    summary = f"prepared {result.prepared} images at {args.size}x{args.size} px in {args.out}"
    if result.excluded_views:
        summary += f" (views left out: {', '.join(f'{v} {n}' for v, n in sorted(result.excluded_views.items()))})"
    if result.failed:
        name, reason = result.failed[0]
        print(f"{summary}; {len(result.failed)} failed (first: {name}: {reason}), all listed in {args.out}/failed.csv", file=sys.stderr)
        return 1
    print(summary)
    return 0


# --- phantoms (cxrdx.data.phantoms) ------------------------------------------------------------
def _phantoms_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write images/, Data_Entry_2017.csv, BBox_List_2017.csv")
    parser.add_argument("--n", type=_POSITIVE_INT, default=3000, help="number of images (default: 3000)")
    parser.add_argument("--size", type=_POSITIVE_INT, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--seed", type=_COUNT, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument(
        "--tail-floor",
        type=_FRACTION,
        default=0.0,
        help="raise every finding's prevalence to at least this fraction (default: 0: the paper's long tail)",
    )
    parser.add_argument(
        "--site",
        type=int,
        choices=(1, 2),
        default=1,
        help="2: other patients through another scanner, in the csv layout (labels.csv), an external test set",
    )


def _phantoms(args: argparse.Namespace) -> int:
    from cxrdx.data.phantoms import generate_phantoms, generate_second_site

    check_output_dir(args.out, "--out")
    if args.site == 2:
        out = generate_second_site(args.out, n=args.n, size=args.size, seed=args.seed, tail_floor=args.tail_floor)
        print(f"wrote {args.n} second-site phantom images ({args.size}x{args.size}) and labels.csv to {out}")
        return 0
    out = generate_phantoms(args.out, n=args.n, size=args.size, seed=args.seed, tail_floor=args.tail_floor)
    boxes = sum(1 for _ in open(out / "BBox_List_2017.csv", encoding="utf-8")) - 1
    print(f"wrote {args.n} phantom images ({args.size}x{args.size}) and {boxes} boxes to {out}")
    return 0


# --- models (cxrdx.models) ---------------------------------------------------------------------
def _models_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME", help="timm model names (default: the paper's three)")
    parser.add_argument("--input-size", type=_POSITIVE_INT, default=224, help="square input side in pixels (default: 224)")
    parser.add_argument("--in-chans", type=_POSITIVE_INT, default=1, help="input channels (default: 1; 3 = ImageNet stem)")
    parser.add_argument("--num-findings", type=_POSITIVE_INT, default=14, help="outputs (default: 14; 1000 = ImageNet head)")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format")


def _models(args: argparse.Namespace) -> int:
    import csv
    import json

    from cxrdx.models import PAPER_MODELS, model_table

    rows = model_table(args.names or PAPER_MODELS, args.input_size, args.in_chans, args.num_findings)
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0

    def mega(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 1e6:.0f} M"

    header = ["Model", "Params", "MACs", "FLOPs (2 per MAC)", "Resolution (C*H*W)", "ImageNet weights (paper presets)", "First layer"]
    table = [
        [r["model"], f"{r['params'] / 1e6:.1f} M", mega(r["macs"]), mega(r["flops"]), r["resolution"], r["weights"], r["first_conv"]]
        for r in rows
    ]
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([*header, "note"])
        writer.writerows([*line, r["note"]] for line, r in zip(table, rows))
    else:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in table:
            print("| " + " | ".join(line) + " |")
        print(
            '\nMACs = multiply-accumulates (the unit of the paper\'s "FLOPs" column); '
            "counted by torch.utils.flop_counter (convolutions, matrix products, attention). First layer: "
            "new = a freshly initialised 1-channel convolution (the released code), summed = RGB kernels summed."
        )
        for r in rows:
            if r["note"]:
                print(f"{r['model']}: {r['note']}", file=sys.stderr)
    return 0


# --- checkpoints (cxrdx.checkpoint) -------------------------------------------------------------
def _trust_pickle_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="also load an old pickle checkpoint (cxrdx-checkpoint/1); unpickling can run code hidden in "
        "the file: only for files you trust",
    )


def _convert_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="OLD", help="an old pickle checkpoint (cxrdx-checkpoint/1), e.g. RUN/checkpoints/best.pt")
    parser.add_argument("--out", required=True, help="the checkpoint to write (cxrdx-checkpoint/2: safetensors weights, JSON header)")
    _trust_pickle_arg(parser)


def _convert(args: argparse.Namespace) -> int:
    from cxrdx.checkpoint import FORMAT, convert_checkpoint

    convert_checkpoint(args.source, args.out, trust_pickle=args.trust_pickle)
    print(f"wrote {args.out} ({FORMAT})")
    return 0


# --- import (cxrdx.imported) ---------------------------------------------------------------------
def _import_args(parser: argparse.ArgumentParser) -> None:
    from cxrdx.imported import SOURCES

    parser.add_argument("source", metavar="SOURCE", help="the pretrained model: " + ", ".join(SOURCES))
    parser.add_argument("--out", required=True, help="the checkpoint to write (cxrdx-checkpoint/2: safetensors weights, JSON header)")
    parser.add_argument(
        "--weights",
        metavar="FILE",
        help="a local copy of the upstream weights file (required for chexnet; without it torchxrayvision's loader downloads its file)",
    )
    _trust_pickle_arg(parser)


def _import(args: argparse.Namespace) -> int:
    from cxrdx.checkpoint import FORMAT, save_checkpoint
    from cxrdx.imported import import_model

    result = import_model(args.source, args.weights, trust_pickle=args.trust_pickle)
    save_checkpoint(args.out, result.checkpoint)
    provenance = result.checkpoint.provenance
    print(
        f"wrote {args.out} ({FORMAT}): {result.checkpoint.model_name}, {len(result.checkpoint.findings)} findings, "
        f"{result.checkpoint.preprocess} preprocessing, weights sha256 {provenance['sha256']} (no published hash to verify)"
    )
    if result.missing:
        print(f"not predicted by this model (n/a): {', '.join(result.missing)}")
    return 0


# --- train (cxrdx.engine) ----------------------------------------------------------------------
def _train_args(parser: argparse.ArgumentParser) -> None:
    from cxrdx.config import preset_names

    parser.add_argument(
        "--config",
        metavar="PRESET|FILE",
        help="a built-in preset or a YAML file. Built-in: " + ", ".join(preset_names()) + ". paper/* train "
        "as the paper's released code did; recommended/* with cxrdx's changes (README: deviations). "
        "Default: the built-in defaults, the released hyper-parameters on a randomly initialised "
        "resnet50 (model.pretrained=none)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.global_batch=64 --set data.cache=cache/x (repeatable)",
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    parser.add_argument(
        "--stop-after-epoch",
        type=_POSITIVE_INT,
        metavar="N",
        help="stop once N epochs are done (the schedule still spans optim.epochs; continue with --resume)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    _trust_pickle_arg(parser)


def _train(args: argparse.Namespace) -> int:
    import os

    from cxrdx.config import apply_overrides, config_from_dict, load_config
    from cxrdx.engine import train
    from cxrdx.rundir import read_config
    from cxrdx.runtime import leave_torchrun_worker

    if args.resume:
        if args.config:
            raise CxrdxError("--resume continues a run with its own config.yaml; drop --config")
        config = config_from_dict(apply_overrides(read_config(args.resume).to_dict(), args.overrides))
        config.out = args.resume
    else:
        config = load_config(args.config, args.overrides)
    check_output_dir(config.out, "out")
    with _failed_run_cleanup(Path(config.out), main=int(os.environ.get("RANK", "0")) == 0):
        run_dir = train(
            config,
            resume=bool(args.resume),
            stop_after_epoch=args.stop_after_epoch,
            progress=not args.quiet,
            trust_pickle=args.trust_pickle,
        )
    if int(os.environ.get("RANK", "0")) == 0:
        print(run_dir)
    leave_torchrun_worker()
    return 0


@contextlib.contextmanager
def _failed_run_cleanup(run_dir: Path, main: bool) -> Iterator[None]:
    """A run that fails before its first checkpoint leaves no folder behind (when it made the folder);
    a later failure leaves RUN/FAILED with the error. A successful run removes an earlier FAILED."""
    created = not run_dir.exists()
    try:
        yield
    except BaseException as exc:
        if main and run_dir.is_dir():
            if created and not any((run_dir / "checkpoints").glob("*.pt")):
                shutil.rmtree(run_dir, ignore_errors=True)
            else:
                from cxrdx.atomic import write_text

                reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(OSError):  # the run's own error is the one to report
                    write_text(run_dir / FAILED, reason + "\n")
        raise
    if main:
        (run_dir / FAILED).unlink(missing_ok=True)


# --- evaluate, compare (cxrdx.metrics / stats / report) ----------------------------------------
def _inference_args(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("--checkpoint", required=True, help="a cxrdx checkpoint, e.g. RUN/checkpoints/best.pt")
    parser.add_argument("--cache", help="prepared cache (default: the one named in the checkpoint's config)")
    parser.add_argument("--data-dir", help="raw image folder with its Data_Entry table, instead of a cache")
    parser.add_argument("--split-file", help="split CSV (default: RUN/split.csv next to the checkpoint)")
    parser.add_argument("--split", default=split, help=f"split to use: train, val, test or all (default: {split})")
    parser.add_argument("--tta-hflip", action="store_true", help="average the probabilities of each image and its mirror")
    parser.add_argument("--batch-size", type=_POSITIVE_INT, default=64, help="images per forward pass")
    parser.add_argument("--workers", type=_COUNT, help="data loader processes (default: the checkpoint's data.workers)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--allow-missing", action="store_true", help="predict the split's images that are there and name the others, instead of stopping"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _trust_pickle_arg(parser)


def _inference_kwargs(args: argparse.Namespace) -> dict:
    return {
        "cache": args.cache,
        "split_file": args.split_file,
        "data_dir": args.data_dir,
        "hflip": args.tta_hflip,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "progress": not args.quiet,
        "allow_missing": args.allow_missing,
        "trust_pickle": args.trust_pickle,
    }


def _report_notes(command: str, caught: list) -> None:
    """Metric warnings (a finding without positives...) as one-line notes on stderr."""
    for item in caught:
        print(f"cxrdx {command}: note: {item.message}", file=sys.stderr)


def _evaluate_args(parser: argparse.ArgumentParser) -> None:
    _inference_args(parser, "test")
    parser.add_argument("--out", required=True, help="folder for predictions.csv, labels.csv, metrics.json, report.md, roc.png")
    parser.add_argument(
        "--thresholds",
        default="0.5",
        help="decision thresholds: a number (default: 0.5, the paper), checkpoint (stored by calibrate), "
        "or youden / f1 chosen per finding on the val split",
    )
    parser.add_argument(
        "--bootstrap", type=_COUNT, default=0, metavar="N", help="add patient-level bootstrap CIs with N replicates (default: 0: none)"
    )
    parser.add_argument(
        "--expert-labels",
        metavar="CSV",
        nargs="?",
        const="",
        help="AUROC against Google's 2019 adjudicated labels (no CSV: the copy shipped with cxrdx)",
    )
    parser.add_argument("--name", help="model name in the tables (default: run folder and model)")
    parser.add_argument("--dataset", help="with --data-dir: its layout (chexpert, mimic, padchest, vindr, rsna, csv; default nih)")
    parser.set_defaults(split=None)  # external images (--dataset, another --cache) have no split of the run: all


def _evaluate(args: argparse.Namespace) -> int:
    import warnings

    from cxrdx.data.packaged import google2019_labels
    from cxrdx.evaluation import default_split, evaluate_checkpoint
    from cxrdx.report import format_mean_ci
    from cxrdx.runtime import leave_torchrun_worker

    check_output_dir(args.out, "--out")
    expert = google2019_labels() if args.expert_labels == "" else args.expert_labels
    dataset = {"csv": "generic"}.get(args.dataset, args.dataset)
    split = args.split or default_split(args.checkpoint, args.cache, dataset, args.trust_pickle)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_checkpoint(
            args.checkpoint, args.out, split, args.thresholds, args.bootstrap, expert, args.name, dataset=dataset, **_inference_kwargs(args)
        )
    if result is not None:  # under torchrun: rank 0 alone
        _report_notes("evaluate", caught)
        overall = result["overall"]
        print(
            f"{result['settings']['images']} images; mean AUROC {format_mean_ci(overall['auroc'])}; "
            f"exact-match accuracy {overall['exact_match_accuracy']:.3f}"
        )
        print(f"wrote {args.out}/ (predictions.csv, labels.csv, metrics.json, report.md, roc.png, reliability.png)")
    leave_torchrun_worker()
    return 0


def _compare_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN", help="evaluation folders (or predictions.csv files) of the same images")
    parser.add_argument("--names", nargs="+", help="model names, one per RUN (default: the names evaluate recorded, else run folder names)")
    parser.add_argument("--labels", help="labels: evaluate's labels.csv or a Data_Entry table (default: labels.csv beside the first RUN)")
    parser.add_argument(
        "--threshold",
        type=_FRACTION,
        help="one decision threshold for Table 4, for every model (default: each run's own thresholds "
        "from the metrics.json beside its predictions, else 0.5)",
    )
    parser.add_argument("--out", help="folder for the tables and roc.png")
    parser.add_argument(
        "--format",
        nargs="+",
        choices=["md", "csv", "json"],
        default=["md", "csv", "json"],
        help="table formats written to --out (default: all three); Markdown is always printed",
    )
    parser.add_argument(
        "--external",
        nargs="+",
        metavar="EVAL",
        help="evaluation folders of the same model on other datasets: print the generalisation table "
        "against RUN, its internal test split (--names: RUN's name first, then one per EVAL)",
    )


def _compare(args: argparse.Namespace) -> int:
    import warnings

    from cxrdx.evaluation import compare_runs
    from cxrdx.report import markdown

    if args.out:
        check_output_dir(args.out, "--out")
    if args.external:
        return _compare_external(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, tables = compare_runs(args.runs, args.names, args.labels, args.threshold, args.out, args.format)
    _report_notes("compare", caught)
    print("\n".join(markdown(t) for t in tables))
    if args.out:
        print(f"wrote {args.out}/ ({len(tables)} tables as {', '.join(args.format)}, roc.png)")
    return 0


def _compare_external(args: argparse.Namespace) -> int:
    from cxrdx.external import compare_external
    from cxrdx.report import markdown

    if len(args.runs) != 1:
        raise CxrdxError(f"--external: give one RUN (the evaluation on the internal test split), not {len(args.runs)}")
    _, table = compare_external(args.runs[0], args.external, args.names, args.out, args.format)
    print(markdown(table))
    if args.out:
        print(f"wrote {args.out}/ (generalisation as {', '.join(args.format)})")
    return 0


def _calibrate_args(parser: argparse.ArgumentParser) -> None:
    _inference_args(parser, "val")
    parser.add_argument(
        "--thresholds",
        choices=["youden", "f1"],
        help="choose per-finding thresholds on the split (default, without any option: youden, --temperature and --ood)",
    )
    parser.add_argument("--temperature", action="store_true", help="fit per-finding temperature scaling on the split")
    parser.add_argument(
        "--ood",
        action="store_true",
        help="refit the input guard's content check: features of the training split, threshold keeping 99%% of the split",
    )
    parser.add_argument("--out", help="write the calibrated checkpoint here (default: replace --checkpoint)")


def _calibrate(args: argparse.Namespace) -> int:
    import warnings

    from cxrdx.evaluation import calibrate_checkpoint

    check_output_file(args.out or args.checkpoint, "--out")
    every = args.thresholds is None and not args.temperature and not args.ood  # no option: calibrate all three
    # the guard fits on the prepared cache: by default not with --data-dir
    thresholds, temperature, ood = ("youden", True, args.data_dir is None) if every else (args.thresholds, args.temperature, args.ood)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt, summary = calibrate_checkpoint(args.checkpoint, args.out, thresholds, temperature, args.split, ood, **_inference_kwargs(args))
    _report_notes("calibrate", caught)
    if len(summary.columns):
        print(summary.round(4).to_string())
    if ood and ckpt.guard is not None:
        print(f"input guard {ckpt.guard.describe()}")
    print(f"wrote {args.out or args.checkpoint}")
    return 0


# --- explain, localize (cxrdx.explain) ---------------------------------------------------------
def _method_names() -> str:
    from cxrdx.explain.registry import METHODS

    return ", ".join(f"{name} (default)" if name == "groupcam" else name for name in METHODS)


def _cam_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a cxrdx checkpoint, e.g. RUN/checkpoints/best.pt")
    parser.add_argument("--groups", type=_POSITIVE_INT, default=32, help="Group-CAM channel groups (default: 32)")
    parser.add_argument(
        "--batch-size", type=_POSITIVE_INT, default=32, help="images per forward pass of Group-CAM / Score-CAM (default: 32)"
    )
    parser.add_argument("--target-layer", help="module name to explain, e.g. layer4 (default: chosen for the model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _trust_pickle_arg(parser)


def _cam_setup(args: argparse.Namespace) -> tuple[Predictor, list[nn.Module] | None, dict[str, int]]:
    """The predictor, the target layers (None: automatic) and the method options."""
    from cxrdx.explain.runs import cam_predictor

    predictor, layers = cam_predictor(args.checkpoint, args.device, args.batch_size, args.target_layer, args.trust_pickle)
    return predictor, layers, {"groups": args.groups, "batch_size": args.batch_size}


def _explain_args(parser: argparse.ArgumentParser) -> None:
    _cam_args(parser)
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="PNG, JPEG, TIFF, BMP or DICOM files, or folders of them")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--finding", action="append", help="explain this finding, in any case, e.g. effusion (repeatable)")
    which.add_argument(
        "--predicted", action="store_true", help="the findings at or above the threshold (default; the most probable one when none is)"
    )
    which.add_argument("--all", action="store_true", help="all findings")
    parser.add_argument("--method", default="groupcam", help=_method_names())
    parser.add_argument("--cache", help="batch mode: a prepared cache (default: the run's training cache)")
    parser.add_argument("--split", help="batch mode: explain this split of the cache (train, val or test)")
    parser.add_argument("--split-file", help="split file for --split (default: RUN/split.csv beside the checkpoint)")
    parser.add_argument("--limit", type=_POSITIVE_INT, help="batch mode: at most this many images")
    parser.add_argument("--out", required=True, help="output folder: FINDING/IMAGE.METHOD.png and .npy, explanations.csv")


def _explain(args: argparse.Namespace) -> int:
    from cxrdx.explain.registry import check_methods
    from cxrdx.explain.render import write_explanations
    from cxrdx.explain.runs import explain_inputs
    from cxrdx.findings import resolve_finding

    check_methods([args.method], "method")
    if bool(args.images) == bool(args.split):
        raise CxrdxError("give IMAGE files, or --split NAME (with --cache) for a cache split, not both")
    findings = [resolve_finding(name) for name in args.finding or []]
    check_output_dir(args.out, "--out")
    predictor, layers, options = _cam_setup(args)
    count, items = explain_inputs(predictor, args.checkpoint, args.images, args.split, args.split_file, args.cache, args.limit)
    how = findings or ("all" if args.all else "predicted")
    table = write_explanations(
        predictor,
        items,
        args.out,
        how=how,
        method=args.method,
        target_layers=layers,
        total=count,
        progress=not args.quiet,
        **options,
    )
    failed = table[table["error"] != ""]
    for name, reason in zip(failed["Image Index"], failed["error"]):
        print(f"cxrdx explain: {name}: {reason}", file=sys.stderr)
    maps = table[table["error"] == ""]
    flat = int(maps["flat"].sum())
    print(
        f"{len(maps)} map(s) of {count - len(failed)} image(s) written to {args.out}"
        + (f"; {flat} flat (nothing highlighted)" if flat else "")
    )
    if len(failed):
        print(f"cxrdx explain: {len(failed)} of {count} images could not be read", file=sys.stderr)
    return 1 if len(failed) else 0


def _localize_args(parser: argparse.ArgumentParser) -> None:
    _cam_args(parser)
    parser.add_argument("--boxes", help="BBox_List_2017.csv(.gz) (default: the one in --data-dir, else NIH's shipped with cxrdx)")
    images = parser.add_mutually_exclusive_group()
    images.add_argument("--data-dir", help="folder with the boxed images (NIH layout or phantoms)")
    images.add_argument("--cache", help="a prepared cache holding the boxed images (default: the run's training cache)")
    parser.add_argument("--split", help="only the boxed images of this split (train, val or test)")
    parser.add_argument("--split-file", help="split file for --split (default: RUN/split.csv beside the checkpoint)")
    parser.add_argument(
        "--box-size", type=_POSITIVE_INT, help="pixel size of the images the boxes refer to (default: the original files' size, else 1024)"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["groupcam", "gradcam"], help=f"methods to score (default: groupcam gradcam): {_method_names()}"
    )
    parser.add_argument(
        "--threshold",
        type=_FRACTION,
        default=0.5,
        help="IoU mask: this fraction of the map's max, or of the pixels with --threshold-mode top (default: 0.5)",
    )
    parser.add_argument(
        "--threshold-mode",
        choices=("relative", "top"),
        default="relative",
        help="relative: pixels above the threshold times the map's max; top: that fraction of the hottest pixels",
    )
    parser.add_argument("--tolerance", type=_NONNEGATIVE, default=0.0, help="pointing game: pixels of slack around each box (default: 0)")
    parser.add_argument("--limit", type=_POSITIVE_INT, help="at most this many boxed images")
    parser.add_argument("--out", help="folder for localization.md, localization.json and the per-map records")


def _localize(args: argparse.Namespace) -> int:
    from cxrdx.explain.localization import box_file
    from cxrdx.explain.registry import check_methods
    from cxrdx.explain.runs import localize_checkpoint

    boxes_path = box_file(args.boxes, args.data_dir)
    check_methods(args.methods, "methods")
    if args.out:
        check_output_dir(args.out, "--out")
    predictor, layers, options = _cam_setup(args)
    result = localize_checkpoint(
        predictor,
        args.checkpoint,
        boxes_path,
        args.methods,
        layers,
        split=args.split,
        split_file=args.split_file,
        data_dir=args.data_dir,
        cache=args.cache,
        box_size=args.box_size,
        limit=args.limit,
        threshold=args.threshold,
        mode=args.threshold_mode,
        tolerance=args.tolerance,
        out=args.out,
        progress=not args.quiet,
        **options,
    )
    if result.missing:
        print(f"cxrdx localize: {len(result.missing)} boxed image(s) not found, e.g. {', '.join(result.missing[:3])}", file=sys.stderr)
    sys.stdout.write(result.text)
    if args.out:
        print(f"written to {args.out}/localization.md, localization.json, localization_records.csv")
    return 0


# --- predict, serve, export (cxrdx.predict / serve / export) -----------------------------------
def _model_source_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a cxrdx checkpoint (e.g. RUN/checkpoints/best.pt): PyTorch")
    source.add_argument("--onnx", help="a model written by 'cxrdx export': ONNX Runtime")
    parser.add_argument("--device", default="auto", help="PyTorch device: auto, cpu, cuda, cuda:1 (default: auto)")
    _trust_pickle_arg(parser)


def _load_predictor(args: argparse.Namespace, batch_size: int = 32):
    from cxrdx.export import OnnxPredictor
    from cxrdx.predict import Predictor

    if args.onnx:
        return OnnxPredictor.from_file(args.onnx, batch_size=batch_size)
    return Predictor.from_checkpoint(args.checkpoint, device=args.device, batch_size=batch_size, trust_pickle=args.trust_pickle)


def _predict_args(parser: argparse.ArgumentParser) -> None:
    _model_source_args(parser)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="PNG, JPEG, TIFF, BMP or DICOM files, or folders of them")
    parser.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table", help="output format (default: table)")
    parser.add_argument("--out", help="write the output to this file instead of standard output")
    parser.add_argument("--batch-size", type=_POSITIVE_INT, default=32, help="images per forward pass")
    parser.add_argument(
        "--allow-ood",
        action="store_true",
        help="also predict images the input guard refuses (DICOM header rules: not a chest radiograph; "
        "content check: out of distribution); they stay marked refused",
    )
    parser.add_argument(
        "--dicom-out", metavar="DIR", help="also write a DICOM Structured Report of each accepted DICOM image's findings into DIR"
    )
    parser.add_argument(
        "--heatmaps",
        action="store_true",
        help="with --dicom-out and --checkpoint: also a Secondary Capture of the Group-CAM map of each "
        "accepted DICOM image's most probable positive finding",
    )


def _predict(args: argparse.Namespace) -> int:
    from cxrdx.atomic import write_text
    from cxrdx.predict import format_predictions, printable, scan_images

    if args.out:
        check_output_file(args.out, "--out")
    if args.dicom_out:
        check_output_dir(args.dicom_out, "--dicom-out")
    if args.heatmaps and not (args.dicom_out and args.checkpoint):
        raise CxrdxError("--heatmaps needs --dicom-out DIR and --checkpoint (Group-CAM runs on the PyTorch model)")
    scan = scan_images(args.paths, recursive=args.recursive)
    for name, reason in scan.skipped:
        print(f"cxrdx predict: skipped {printable(name)}: {reason}", file=sys.stderr)
    folders = f"{len(scan.subfolders)} sub-folder(s) ({', '.join(map(printable, scan.subfolders[:3]))}" + (
        ", ...)" if len(scan.subfolders) > 3 else ")"
    )
    if not scan.files:
        hint = f"; add --recursive to look in its {folders}" if scan.subfolders else ""
        raise CxrdxError(f"no image files in {', '.join(args.paths)}{hint}")
    if scan.subfolders:
        print(f"cxrdx predict: note: {folders} not searched; add --recursive to include them", file=sys.stderr)
    files = scan.files
    predictor = _load_predictor(args, args.batch_size)
    if predictor.guard is None:
        print(f"cxrdx predict: note: input guard content check {predictor.guard_status}", file=sys.stderr)
    paths, names = zip(*files)
    predictions = predictor.predict(list(paths), names=list(names), errors="report", progress=len(files) > 1, allow_ood=args.allow_ood)
    text = format_predictions(predictions, args.format)
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)
    if args.dicom_out:
        from cxrdx.dicom_sr import write_srs

        written = write_srs(paths, predictions, predictor.info, args.dicom_out)
        print(f"cxrdx predict: wrote {len(written)} DICOM SR files to {args.dicom_out}", file=sys.stderr)
    if args.heatmaps:
        from cxrdx.dicom_sc import write_heatmaps

        heatmaps = write_heatmaps(predictor, paths, predictions, args.dicom_out)
        print(f"cxrdx predict: wrote {len(heatmaps.written)} DICOM heatmap files to {args.dicom_out}", file=sys.stderr)
        for name, why in heatmaps.skipped:
            print(f"cxrdx predict: no heatmap for {name}: {why}", file=sys.stderr)
    refused = [p for p in predictions if not p.accepted]
    if refused:
        print(
            f"cxrdx predict: {len(refused)} of {len(predictions)} images refused by the input guard"
            + ("" if args.allow_ood else " (predict them anyway with --allow-ood)"),
            file=sys.stderr,
        )
    failed = [p for p in predictions if p.error]
    if failed:
        print(f"cxrdx predict: {len(failed)} of {len(predictions)} images could not be read", file=sys.stderr)
    return 1 if failed else 0


def _serve_args(parser: argparse.ArgumentParser) -> None:
    from cxrdx.serve.settings import LOOPBACK_HOSTS, ServeSettings

    d = ServeSettings()
    _model_source_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port, 1-65535 (default: 8000)")
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model (default: 1)")
    parser.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20, help="larger uploads get 413 (default: 32)")
    parser.add_argument("--queue-size", type=int, default=d.queue_size, help="requests admitted per worker before 503 (default: 16)")
    parser.add_argument(
        "--max-inflight-mb",
        type=float,
        default=d.max_inflight_bytes / 2**20,
        help="upload bytes held at once per worker; more gets 503 before the body is read (default: 256)",
    )
    parser.add_argument(
        "--max-decoded-mb",
        type=float,
        default=d.max_decoded_bytes / 2**20,
        help="images whose header announces more decoded pixel bytes get 422 (default: 128)",
    )
    parser.add_argument(
        "--api-key-file",
        help="file holding the API key that /v1/ requests must send as 'Authorization: Bearer KEY' "
        "(default: the CXRDX_API_KEY environment variable; no key when neither is set)",
    )
    parser.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help=f"also answer requests whose Host header names NAME (repeatable; '*' for any); always: {', '.join(LOOPBACK_HOSTS)}",
    )
    parser.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    parser.add_argument(
        "--rate-limit", default="120/min", help="requests per client address to /v1/, e.g. 120/min, 5/s, or off (default: 120/min)"
    )
    parser.add_argument(
        "--body-timeout", type=float, default=d.body_timeout_s, help="seconds to receive an upload before 408 (default: 60)"
    )
    parser.add_argument("--idle-timeout", type=float, default=5.0, help="seconds an idle keep-alive connection stays open (default: 5)")


def _serve_settings(args: argparse.Namespace):
    """The service's `ServeSettings` from the command line; every bad value is a CxrdxError naming its option."""
    from cxrdx.serve.settings import LOOPBACK_HOSTS, ServeSettings, is_loopback, is_wildcard, megabytes, parse_rate, positive, read_api_key

    if not 1 <= args.port <= 65535:
        raise CxrdxError(f"--port must be between 1 and 65535, got {args.port}")
    for option, value in (("--queue-size", args.queue_size), ("--workers", args.workers)):
        if value < 1:
            raise CxrdxError(f"{option} must be at least 1, got {value}")
    positive("--idle-timeout", args.idle_timeout)
    key = read_api_key(args.api_key_file)
    own = [] if is_loopback(args.host) or is_wildcard(args.host) else [args.host]
    settings = ServeSettings(
        max_upload_bytes=megabytes("--max-upload-mb", args.max_upload_mb),
        queue_size=args.queue_size,
        max_inflight_bytes=megabytes("--max-inflight-mb", args.max_inflight_mb),
        max_decoded_bytes=megabytes("--max-decoded-mb", args.max_decoded_mb),
        body_timeout_s=positive("--body-timeout", args.body_timeout),
        rate_per_minute=parse_rate(args.rate_limit),
        allowed_hosts=(*LOOPBACK_HOSTS, *own, *args.allowed_host),
        api_key=key,
    )
    if not is_loopback(args.host):
        if key is None and not args.insecure:
            raise CxrdxError(
                f"--host {args.host} makes the service reachable from other machines: give it an API key "
                "(--api-key-file FILE or CXRDX_API_KEY) or pass --insecure to serve without one"
            )
        print(
            f"cxrdx serve: warning: listening on {args.host}, reachable from other machines"
            f"{' without an API key (--insecure)' if key is None else ''}; requests must name one of these hosts: "
            f"{', '.join(settings.allowed_hosts)} (add more with --allowed-host); over plain HTTP uploads and the key "
            "travel unencrypted: put a TLS proxy in front",
            file=sys.stderr,
        )
    return settings


def _serve(args: argparse.Namespace) -> int:
    import copy
    import os
    from pathlib import Path

    import uvicorn

    from cxrdx.serve.app import create_app

    settings = _serve_settings(args)  # before the model loads: a bad option costs nothing
    # The service's own request log (method, path, status, milliseconds) replaces uvicorn's access log.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["cxrdx"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    run = dict(host=args.host, port=args.port, log_config=log_config, access_log=False, timeout_keep_alive=args.idle_timeout)
    if args.workers <= 1:
        uvicorn.run(create_app(_load_predictor(args), settings), **run)
        return 0
    source = Path(args.onnx or args.checkpoint)
    if not source.is_file():
        raise CxrdxError(f"{source}: model file not found")
    if args.checkpoint:  # refuse an unreadable or untrusted file here, once, not in every worker
        from cxrdx.checkpoint import load_checkpoint

        load_checkpoint(source, trust_pickle=args.trust_pickle)
    os.environ.update(
        {
            "CXRDX_SERVE_ONNX" if args.onnx else "CXRDX_SERVE_CHECKPOINT": str(source.resolve()),
            "CXRDX_SERVE_DEVICE": args.device,
            "CXRDX_SERVE_SETTINGS": settings.to_json(),
            "CXRDX_SERVE_TRUST_PICKLE": "1" if args.trust_pickle else "",
        }
    )
    if args.api_key_file:  # each worker reads the key itself: it never enters the environment
        os.environ["CXRDX_SERVE_API_KEY_FILE"] = str(Path(args.api_key_file).resolve())
    uvicorn.run("cxrdx.serve.app:app_from_env", factory=True, workers=args.workers, **run)
    return 0


def _listen_args(parser: argparse.ArgumentParser) -> None:
    _model_source_args(parser)
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the results: a JSON and a DICOM SR per image")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=11112, help="TCP port, 1-65535")
    parser.add_argument("--ae-title", default="CXRDX", help="this node's AE title (1-16 characters)")
    parser.add_argument(
        "--allow-ae",
        action="append",
        default=[],
        metavar="AE",
        help="accept associations only from this calling AE title (repeatable; default: any)",
    )
    parser.add_argument("--forward", metavar="AE@HOST:PORT", help="send each SR (and heatmap) to this DICOM node, e.g. a PACS")
    parser.add_argument(
        "--heatmaps",
        action="store_true",
        help="with --checkpoint: also a Secondary Capture of the Group-CAM map of the most probable positive finding",
    )
    parser.add_argument("--queue-size", type=int, default=16, help="images waiting for the model; more are refused (0xA700)")
    parser.add_argument("--retry-interval", type=_POSITIVE, default=60.0, help="seconds between tries to send what waits in DIR/outbox")


def _listen(args: argparse.Namespace) -> int:
    import logging
    import signal
    import time

    from cxrdx.listen import Node, NodeSettings, Peer, check_ae_title, check_port
    from cxrdx.serve.settings import is_loopback

    check_port(args.port, "--port")
    check_ae_title(args.ae_title, "--ae-title")
    for title in args.allow_ae:
        check_ae_title(title, "--allow-ae")
    if args.queue_size < 1:
        raise CxrdxError(f"--queue-size must be at least 1, got {args.queue_size}")
    if args.heatmaps and not args.checkpoint:
        raise CxrdxError("--heatmaps needs --checkpoint (Group-CAM runs on the PyTorch model)")
    settings = NodeSettings(
        out=check_output_dir(args.out, "--out"),
        host=args.host,
        port=args.port,
        ae_title=args.ae_title,
        allow_ae=tuple(args.allow_ae),
        forward=Peer.parse(args.forward) if args.forward else None,
        heatmaps=args.heatmaps,
        queue_size=args.queue_size,
        outbox_retry_s=args.retry_interval,
    )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s cxrdx listen: %(message)s", stream=sys.stderr)
    logging.getLogger("cxrdx.listen").setLevel(logging.INFO)  # ours only: pynetdicom's and highdicom's INFO lines are noise here
    if not is_loopback(args.host):
        print(
            f"cxrdx listen: warning: listening on {args.host}, reachable from other machines; DICOM travels unencrypted"
            + ("" if args.allow_ae else "; restrict callers with --allow-ae"),
            file=sys.stderr,
        )

    def stop(signum: int, frame: object) -> None:  # a service manager's stop (SIGTERM) ends as cleanly as Ctrl-C
        raise KeyboardInterrupt

    node = Node(_load_predictor(args, batch_size=1), settings).start()
    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("cxrdx listen: stopping: finishing the images already received", file=sys.stderr)
    finally:
        node.stop()
    return 0


def _export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a cxrdx checkpoint")
    parser.add_argument("--onnx", required=True, help="the .onnx file to write")
    parser.add_argument(
        "--dynamic-batch", action=argparse.BooleanOptionalAction, default=True, help="any batch size at run time (default: on)"
    )
    _trust_pickle_arg(parser)


def _export(args: argparse.Namespace) -> int:
    from cxrdx.export import export_onnx

    check_output_file(args.onnx, "--onnx")
    result = export_onnx(args.checkpoint, args.onnx, dynamic_batch=args.dynamic_batch, trust_pickle=args.trust_pickle)
    print(
        f"wrote {result.path}: ONNX Runtime matches PyTorch on {result.batch} check images "
        f"(max abs probability difference {result.max_abs_diff:.2g})"
    )
    return 0


# --- report, demo (cxrdx.report / cxrdx.demo) --------------------------------------------------
def _report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="RUN_DIR",
        help="run folders made by train, with what evaluate, explain and localize wrote into them (eval/, explain/, localize/)",
    )
    parser.add_argument("--names", nargs="+", help="model names, one per RUN_DIR (default: folder names)")
    parser.add_argument("--out", help="output folder for report.html (default: RUN_DIR/report for one run, ./report for several)")
    parser.add_argument("--title", default="Chest X-ray diagnosis: report", help="page title")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--template-dir", help="folder with report.html.j2 and/or report.css replacing the packaged ones (rebrand, translate)"
    )


def _report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from cxrdx.report import SUMMARY, headline, write_report

    out = args.out or (Path(args.runs[0]) / "report" if len(args.runs) == 1 else Path("report"))
    check_output_dir(out, "--out")
    path = write_report(args.runs, out, args.names, title=args.title, progress=not args.quiet, template_dir=args.template_dir)
    print(headline(json.loads((path.parent / SUMMARY).read_text(encoding="utf-8"))))
    print(path)
    return 0


def _demo_args(parser: argparse.ArgumentParser) -> None:
    from cxrdx.demo import DemoSettings

    d = DemoSettings()
    parser.add_argument("--out", type=Path, default=d.out, help=f"output folder (default: {d.out})")
    parser.add_argument("--n", type=_POSITIVE_INT, default=d.n, help=f"phantom images (default: {d.n})")
    parser.add_argument("--size", type=_POSITIVE_INT, default=d.size, help=f"phantom and cache side in pixels (default: {d.size})")
    parser.add_argument(
        "--input-size", type=_POSITIVE_INT, default=d.input_size, help=f"model input side in pixels (default: {d.input_size})"
    )
    parser.add_argument("--epochs", type=_POSITIVE_INT, default=d.epochs, help=f"training epochs per loss (default: {d.epochs})")
    parser.add_argument("--seed", type=_COUNT, default=d.seed, help="random seed; the same seed gives the same results")


def _demo(args: argparse.Namespace) -> int:
    from cxrdx.demo import DemoSettings, run_demo

    check_output_dir(args.out, "--out")
    run_demo(DemoSettings(out=args.out, n=args.n, size=args.size, input_size=args.input_size, epochs=args.epochs, seed=args.seed))
    return 0


# --- card (cxrdx.card) -------------------------------------------------------------------------
def _card_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the model, e.g. RUN/checkpoints/best.pt")
    parser.add_argument(
        "--eval",
        nargs="+",
        default=None,
        metavar="DIR",
        help="evaluation folders of `cxrdx evaluate` (default: those of the run's card and RUN/eval)",
    )
    parser.add_argument("--out", required=True, help="card.md (card.json is written beside it), or a folder for card.md and card.json")


def _card(args: argparse.Namespace) -> int:
    from cxrdx.card import build_card, run_evaluations, write_card
    from cxrdx.rundir import config_path, run_dir_of

    folder = run_dir_of(args.checkpoint)
    run_dir = folder if config_path(folder).is_file() else None
    evaluations = args.eval if args.eval is not None else (run_evaluations(run_dir) if run_dir is not None else [])
    card = build_card(args.checkpoint, evaluations, run_dir)
    md, js = write_card(card, args.out)
    print(f"wrote {md} and {js}")
    if card.not_for_clinical_use:
        print(f"not for clinical use: {'; '.join(card.not_for_clinical_use)}")
    return 0


def _commands() -> list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Handler]]:
    return [
        ("demo", "run the whole system on built-in phantoms and write a report", _demo_args, _demo),
        ("phantoms", "generate a synthetic dataset in the ChestX-ray14 layout", _phantoms_args, _phantoms),
        ("download", "fetch, verify and unpack the 12 NIH image archives", _download_args, _download),
        ("split", "write a train/val/test split file (random, patient-wise, official, imported)", _split_args, _split),
        ("stats", "print the paper's Table 1 for a split, or pixel mean/std", _stats_args, _stats),
        ("prepare", "decode and resize every image once into a memory-mapped cache", _prepare_args, _prepare),
        ("models", "print the paper's Table 2 (parameters, FLOPs, input size)", _models_args, _models),
        ("train", "train a model (single process or torchrun DDP)", _train_args, _train),
        ("evaluate", "predict a split and write predictions, metrics and ROC curves", _evaluate_args, _evaluate),
        (
            "calibrate",
            "choose per-finding thresholds and temperatures on validation; store them in the checkpoint",
            _calibrate_args,
            _calibrate,
        ),
        ("compare", "Tables 3-5: models side by side with DeLong, ANOVA, Bonferroni", _compare_args, _compare),
        ("explain", "Group-CAM and Grad-CAM-family heatmaps for images", _explain_args, _explain),
        ("localize", "pointing game and IoU of heatmaps against boxes", _localize_args, _localize),
        ("predict", "probabilities and positive findings for image files", _predict_args, _predict),
        ("serve", "start the prediction web service and its page", _serve_args, _serve),
        ("listen", "run a DICOM node: predict the radiographs a PACS sends, return DICOM SRs", _listen_args, _listen),
        ("export", "export a checkpoint to ONNX and check it against PyTorch", _export_args, _export),
        ("convert", "rewrite an old pickle checkpoint in the safe format (safetensors + JSON header)", _convert_args, _convert),
        ("import", "a pretrained chest X-ray model (torchxrayvision, CheXNet) as a cxrdx checkpoint", _import_args, _import),
        ("report", "write the HTML report for one or more run folders", _report_args, _report),
        ("card", "write a model card (Markdown and JSON) for a checkpoint and its evaluations", _card_args, _card),
    ]


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """cxrdx's own warnings (left-out images...) as 'cxrdx COMMAND: warning: ...' lines, the moment they happen."""
    import warnings

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001 (warnings' signature)
        if issubclass(category, CxrdxWarning):
            print(f"cxrdx {command}: warning: {message}", file=sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cxrdx", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"cxrdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, handler in _commands():
        command = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
        add_args(command)
        command.set_defaults(handler=handler)
    return parser


def _as_options(error: CxrdxError) -> str:
    """The error's message, naming the command-line option where the library named its parameter."""
    if isinstance(error, ParameterError):
        return f"--{error.parameter.replace('_', '-')} {error.value}: {error.problem}"
    return str(error)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except _UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        with _one_line_warnings(args.command):
            return int(args.handler(args) or 0)
    except CxrdxError as exc:
        print(f"cxrdx {args.command}: error: {_as_options(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the system refused a read or write midway (disk full, permissions changed)
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"cxrdx {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"cxrdx {args.command}: interrupted", file=sys.stderr)
        return 130
