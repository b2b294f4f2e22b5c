"""The `cxrdx` command: thin argument parsing over the library; one function pair per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from cxrdx import __version__
from cxrdx.errors import CxrdxError

Handler = Callable[[argparse.Namespace], int]


def _pending(name: str) -> Handler:
    def run(args: argparse.Namespace) -> int:
        raise CxrdxError(f"'cxrdx {name}' is not available in this build yet")

    return run


def _no_args(parser: argparse.ArgumentParser) -> None:
    return None


# --- data: download, split, stats (cxrdx.data.download / splits / metadata) -------------------
# <section data>
_download_args, _download = _no_args, _pending("download")
_split_args, _split = _no_args, _pending("split")
_stats_args, _stats = _no_args, _pending("stats")
# </section data>

# --- images: prepare (cxrdx.data.cache) --------------------------------------------------------
# <section prepare>
_prepare_args, _prepare = _no_args, _pending("prepare")
# </section prepare>

# --- phantoms (cxrdx.data.phantoms) ------------------------------------------------------------
# <section phantoms>
_phantoms_args, _phantoms = _no_args, _pending("phantoms")
# </section phantoms>

# --- models (cxrdx.models) ---------------------------------------------------------------------
# <section models>
_models_args, _models = _no_args, _pending("models")
# </section models>

# --- train (cxrdx.engine) ----------------------------------------------------------------------
# <section train>
_train_args, _train = _no_args, _pending("train")
# </section train>

# --- evaluate, compare (cxrdx.metrics / stats / report) ----------------------------------------
# <section evaluate>
_evaluate_args, _evaluate = _no_args, _pending("evaluate")
_compare_args, _compare = _no_args, _pending("compare")
_calibrate_args, _calibrate = _no_args, _pending("calibrate")
# </section evaluate>

# --- explain, localize (cxrdx.explain) ---------------------------------------------------------
# <section explain>
_explain_args, _explain = _no_args, _pending("explain")
_localize_args, _localize = _no_args, _pending("localize")
# </section explain>

# --- predict, serve, export (cxrdx.predict / serve / export) -----------------------------------
# <section predict>
_predict_args, _predict = _no_args, _pending("predict")
_serve_args, _serve = _no_args, _pending("serve")
_export_args, _export = _no_args, _pending("export")
# </section predict>

# --- report, demo (cxrdx.report / cxrdx.demo) --------------------------------------------------
# <section report>
_report_args, _report = _no_args, _pending("report")
_demo_args, _demo = _no_args, _pending("demo")
# </section report>


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
        ("calibrate", "choose per-finding thresholds and temperatures on validation; store them in the checkpoint", _calibrate_args, _calibrate),
        ("compare", "Tables 3-5: models side by side with DeLong, ANOVA, Bonferroni", _compare_args, _compare),
        ("explain", "Group-CAM and Grad-CAM-family heatmaps for images", _explain_args, _explain),
        ("localize", "pointing game and IoU of heatmaps against boxes", _localize_args, _localize),
        ("predict", "probabilities and positive findings for image files", _predict_args, _predict),
        ("serve", "start the prediction web service and its page", _serve_args, _serve),
        ("export", "export a checkpoint to ONNX and check it against PyTorch", _export_args, _export),
        ("report", "write the HTML report for one or more run folders", _report_args, _report),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cxrdx", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cxrdx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_args, handler in _commands():
        command = sub.add_parser(name, help=help_text, description=help_text)
        add_args(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except CxrdxError as exc:
        print(f"cxrdx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cxrdx {args.command}: interrupted", file=sys.stderr)
        return 130
