"""Clear errors and nothing silent: every command checks its output paths and values before any work,
with one line and exit 2; skipped or left-out inputs are named; failed runs clean up after themselves."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
import urllib.error
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
from helpers import run_checkpoint
from PIL import Image

from cxrdx import evaluation
from cxrdx.atomic import write_text
from cxrdx.checkpoint import load_checkpoint
from cxrdx.checks import check_output_dir, check_output_file
from cxrdx.cli import main
from cxrdx.data.cache import open_cache, resize_square
from cxrdx.data.dataset import rows_for_split
from cxrdx.data.splits import read_split
from cxrdx.errors import CxrdxError, ImageReadError, MissingImagesWarning
from cxrdx.export import OnnxPredictor
from cxrdx.findings import FINDINGS, resolve_finding
from cxrdx.predict import csv_safe, printable


@pytest.fixture(scope="module")
def run_dir(phantom_cache: Path, phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with split.csv and an untrained tiny model (64-px cache, 32-px input)."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    run.mkdir()
    shutil.copy(phantom_split, run / "split.csv")
    run_checkpoint(run, phantom_cache)
    return run


@pytest.fixture(scope="module")
def ghost_split(phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom split plus three train and two test images that the cache does not hold."""
    table = pd.read_csv(phantom_split)
    ghosts = pd.DataFrame({"Image Index": [f"ghost_{i}.png" for i in range(5)], "split": ["train"] * 3 + ["test"] * 2})
    path = tmp_path_factory.mktemp("ghost") / "split.csv"
    pd.concat([table, ghosts]).to_csv(path, index=False)
    return path


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


# --- output paths ------------------------------------------------------------------------------------


def test_output_checks(tmp_path: Path) -> None:
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    assert check_output_file(tmp_path / "new" / "deeper" / "out.csv", "--out") == tmp_path / "new" / "deeper" / "out.csv"
    assert check_output_dir(tmp_path / "new" / "folder", "--out") == tmp_path / "new" / "folder"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(CxrdxError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--out")
    with pytest.raises(CxrdxError, match=r"a\.txt is a file, not a folder"):
        check_output_file(afile / "run" / "x.csv", "--out")
    with pytest.raises(CxrdxError, match="is a file; give a folder"):
        check_output_dir(afile, "--out")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CxrdxError, match="broken link"):
        check_output_dir(tmp_path / "dangling" / "x", "--out")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc, where no one can create files")
def test_unwritable_folder(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(CxrdxError, match="cannot write in /proc"):
        check_output_dir("/proc/cxrdx-eval", "--out")
    code, _, err = run_cli(["evaluate", "--checkpoint", "missing.pt", "--out", "/proc/cxrdx-eval"], capsys)
    assert_one_line_error(code, err, "cannot write in /proc")


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(["evaluate", "--checkpoint", "missing.pt", "--out", locked / "eval"], capsys)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(code, err, "cannot write in")


def test_every_command_checks_its_output_before_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The checkpoints and inputs here do not exist: the output error must come first."""
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    missing = tmp_path / "missing.pt"
    cases = [
        (["train", "--set", f"out={afile}/run"], "a.txt is a file"),
        (["predict", "--checkpoint", missing, "--out", tmp_path, "x.png"], "is a folder"),
        (["evaluate", "--checkpoint", missing, "--out", afile], "is a file"),
        (["calibrate", "--checkpoint", missing, "--out", tmp_path], "is a folder"),
        (["compare", tmp_path, "--out", afile], "is a file"),
        (["explain", "--checkpoint", missing, "--out", afile, "x.png"], "is a file"),
        (["localize", "--checkpoint", missing, "--data-dir", tmp_path, "--boxes", missing, "--out", afile], "is a file"),
        (["export", "--checkpoint", missing, "--onnx", tmp_path], "is a folder"),
        (["report", tmp_path, "--out", afile], "is a file"),
        (["split", "--metadata", missing, "--out", tmp_path], "is a folder"),
        (["prepare", "--data-dir", tmp_path, "--out", afile], "is a file"),
        (["phantoms", "--out", afile], "is a file"),
        (["download", "--to", afile], "is a file"),
        (["demo", "--out", afile], "is a file"),
    ]
    for argv, needle in cases:
        code, _, err = run_cli(argv, capsys)
        assert_one_line_error(code, err, f"cxrdx {argv[0]}: error: ", needle)


# --- values --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--set", "optim.global_batch=0"], "optim.global_batch must be a positive number, got 0"),
        (["train", "--set", "optim.lr=nan"], "optim.lr must be zero or more, got nan"),
        (["train", "--set", "optim.epochs=-1"], "optim.epochs must be a positive number, got -1"),
        (["train", "--set", "optim.epochs=0"], "optim.epochs must be a positive number, got 0"),
        (["train", "--set", "optim.weight_decay=-0.1"], "optim.weight_decay must be zero or more"),
        (["train", "--set", "ema.decay=1.5"], "ema.decay must lie in [0, 1]"),
        (["train", "--set", "data.workers=-1"], "data.workers must be zero or more"),
        (["train", "--set", "optim.pct_start=1"], "optim.pct_start must lie between 0 and 1"),
        (["predict", "--checkpoint", "x.pt", "--batch-size", "0", "x.png"], "argument --batch-size: must be a positive number, got 0"),
        (["evaluate", "--checkpoint", "x.pt", "--out", "e", "--batch-size", "-3"], "argument --batch-size: must be a positive"),
        (["evaluate", "--checkpoint", "x.pt", "--out", "e", "--bootstrap", "many"], "expected a whole number, got 'many'"),
        (["localize", "--checkpoint", "x.pt", "--threshold", "2"], "argument --threshold: must lie in [0, 1], got 2.0"),
        (["localize", "--checkpoint", "x.pt", "--tolerance", "inf"], "argument --tolerance: must be zero or more, got inf"),
        (["phantoms", "--out", "p", "--n", "0"], "argument --n: must be a positive number"),
        (["split", "--metadata", "m.csv", "--out", "s.csv", "--seed", "-1"], "argument --seed: must be zero or more"),
        (["explain", "--checkpoint", "x.pt", "--out", "o", "--limit", "0", "x.png"], "argument --limit"),
        (["predict", "x.png"], "one of the arguments --checkpoint --onnx is required"),
    ],
)
def test_bad_values_are_one_line_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, needle)


def test_config_file_values_are_checked_where_read(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text("optim:\n  global_batch: -4\n")
    code, _, err = run_cli(["train", "--config", preset], capsys)
    assert_one_line_error(code, err, f"{preset}: optim.global_batch must be a positive number, got -4")


# --- ONNX metadata ----------------------------------------------------------------------------------------


def onnx_with_metadata(path: Path, metadata: str) -> Path:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])],
        "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 14])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 14])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "cxrdx", metadata
    onnx.save(model, path)
    return path


GOOD_INFO = {
    "format": "cxrdx-onnx/1",
    "model_name": "m",
    "findings": list(FINDINGS),
    "thresholds": [0.5] * 14,
    "input_size": 32,
    "mean": [0.5],
    "std": [0.25],
    "cache_size": 64,
}


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"extra": 1}, "unexpected cxrdx metadata (unexpected extra)"),
        ({"mean": None}, "mean must be a list of numbers"),
        ({"thresholds": [0.5] * 3}, "thresholds must be a list of 14 numbers"),
        ({"thresholds": [1.5] * 14}, "thresholds[0] must lie in [0, 1], got 1.5"),
        ({"input_size": "224"}, "input_size must be a positive whole number, got '224'"),
        ({"std": [0]}, "std[0] must be a positive number, got 0"),
        ({"temperature": [-1.0] * 14}, "temperature[0] must be a positive number"),
        ({"findings": "Effusion"}, "findings must be a list of names"),
    ],
)
def test_onnx_metadata_is_checked(change: dict, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    info = {**GOOD_INFO, **change}
    path = onnx_with_metadata(tmp_path / "m.onnx", json.dumps(info))
    with pytest.raises(CxrdxError, match="invalid cxrdx metadata|unexpected cxrdx metadata") as caught:
        OnnxPredictor.from_file(path)
    assert needle in str(caught.value)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(image)
    code, _, err = run_cli(["predict", "--onnx", path, image], capsys)
    assert_one_line_error(code, err, needle)


def test_onnx_metadata_other_damage(tmp_path: Path) -> None:
    with pytest.raises(CxrdxError, match="not a JSON object"):
        OnnxPredictor.from_file(onnx_with_metadata(tmp_path / "a.onnx", "[1, 2]"))
    missing = {k: v for k, v in GOOD_INFO.items() if k != "std"}
    with pytest.raises(CxrdxError, match="missing std"):
        OnnxPredictor.from_file(onnx_with_metadata(tmp_path / "b.onnx", json.dumps(missing)))
    fewer = {**GOOD_INFO, "findings": list(FINDINGS[:2]), "thresholds": [0.5, 0.5]}
    with pytest.raises(CxrdxError, match=r"outputs shape \[1, 14\], but its metadata names 2 findings"):
        OnnxPredictor.from_file(onnx_with_metadata(tmp_path / "c.onnx", json.dumps(fewer)))
    assert OnnxPredictor.from_file(onnx_with_metadata(tmp_path / "d.onnx", json.dumps(GOOD_INFO))).findings == list(FINDINGS)


# --- split and cache ------------------------------------------------------------------------------------


def test_split_images_missing_from_the_cache(phantom_cache: Path, ghost_split: Path) -> None:
    cache, split = open_cache(phantom_cache), read_split(ghost_split)
    with pytest.raises(CxrdxError, match=r"3 of the \d+ images of the 'train' split are not in the cache .*ghost_0\.png.*--allow-missing"):
        rows_for_split(cache, split, "train")
    with pytest.warns(MissingImagesWarning, match=r"3 of the \d+ images .* ghost_0\.png, ghost_1\.png, ghost_2\.png \(left out\)"):
        rows = rows_for_split(cache, split, "train", allow_missing=True)
    assert len(rows) == int((split == "train").sum()) - 3
    assert len(rows_for_split(cache, split, "val")) == int((split == "val").sum())  # nothing missing: silent


def test_train_stops_on_a_split_the_cache_lacks_and_leaves_no_folder(
    phantom_cache: Path, ghost_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "run"
    code, _, err = run_cli(
        [
            "train",
            "--set",
            f"data.cache={phantom_cache}",
            "--set",
            f"data.split_file={ghost_split}",
            "--set",
            f"out={out}",
            "--set",
            "model.name=test_resnet",
            "--quiet",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "3 of the", "'train' split are not in the cache", "data.allow_missing=true")
    assert not out.exists()


def test_evaluate_names_images_missing_from_the_cache(
    run_dir: Path, ghost_split: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    argv = ["evaluate", "--checkpoint", run_dir / "checkpoints" / "best.pt", "--split-file", ghost_split, "--quiet"]
    code, _, err = run_cli([*argv, "--out", tmp_path / "strict"], capsys)
    assert_one_line_error(code, err, "2 of the", "'test' split are not in the cache", "ghost_3.png, ghost_4.png")
    assert not (tmp_path / "strict").exists()
    code, _, err = run_cli([*argv, "--out", tmp_path / "lenient", "--allow-missing"], capsys)
    assert code == 0
    assert "ghost_3.png, ghost_4.png (left out)" in err
    notes = json.loads((tmp_path / "lenient" / "metrics.json").read_text())["notes"]
    assert any("ghost_3.png" in note for note in notes)


# --- failed runs and stale temporary files -------------------------------------------------------------------


def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(monkeypatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import cxrdx.engine

    def fails_early(config, **kwargs):
        Path(config.out, "checkpoints").mkdir(parents=True)
        Path(config.out, "config.yaml").write_text("x")
        raise CxrdxError("the data went away")

    monkeypatch.setattr(cxrdx.engine, "train", fails_early)
    code, _, err = run_cli(["train", "--set", f"out={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, "the data went away")
    assert not (tmp_path / "run").exists()


def test_a_run_failing_later_is_marked_failed_and_cleared_by_success(monkeypatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import cxrdx.engine
    import cxrdx.rundir

    run = tmp_path / "run"

    def fails_late(config, **kwargs):
        Path(config.out, "checkpoints").mkdir(parents=True, exist_ok=True)
        Path(config.out, "checkpoints", "last.pt").write_bytes(b"epoch 1")
        raise CxrdxError("disk full in epoch 2")

    monkeypatch.setattr(cxrdx.engine, "train", fails_late)
    code, _, err = run_cli(["train", "--set", f"out={run}"], capsys)
    assert_one_line_error(code, err, "disk full in epoch 2")
    assert (run / "checkpoints" / "last.pt").is_file()
    assert (run / "FAILED").read_text() == "CxrdxError: disk full in epoch 2\n"

    monkeypatch.setattr(cxrdx.engine, "train", lambda config, **kwargs: Path(config.out))
    monkeypatch.setattr(cxrdx.rundir, "read_config", lambda path: cxrdx.config.load_config())
    code, out, _ = run_cli(["train", "--resume", run], capsys)
    assert code == 0 and out.strip() == str(run)
    assert not (run / "FAILED").exists()


def test_stale_temporary_files_are_removed_on_the_next_write(tmp_path: Path) -> None:
    old = time.time() - 2 * 3600
    stale, fresh, other = tmp_path / ".x.csv.a1b2.tmp", tmp_path / ".x.csv.c3d4.tmp", tmp_path / ".y.csv.e5f6.tmp"
    for path in (stale, fresh, other):
        path.write_text("half")
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    write_text(tmp_path / "x.csv", "done\n")
    assert (tmp_path / "x.csv").read_text() == "done\n"
    assert not stale.exists()
    assert fresh.exists() and other.exists()  # a write in progress, and another file's
    assert sorted(p.name for p in tmp_path.glob(".*.tmp")) == [fresh.name, other.name]


# --- predict: what it skips, what it writes ------------------------------------------------------------------


def test_predict_lists_every_skipped_file(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    for name in ("a.png", "b.tif", "=HYPERLINK(1).png", "new\nline.png"):
        Image.fromarray(pixels).save(folder / name, format="TIFF" if name.endswith(".tif") else "PNG")
    (folder / "notes.gif").write_bytes(b"GIF89a")
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    (folder / "sub").mkdir()
    Image.fromarray(pixels).save(folder / "sub" / "c.png")
    out = tmp_path / "p.csv"
    code, _, err = run_cli(
        ["predict", "--checkpoint", run_dir / "checkpoints" / "best.pt", "--device", "cpu", "--format", "csv", "--out", out, folder], capsys
    )
    assert code == 0
    assert "cxrdx predict: skipped notes.gif: not an image extension" in err
    assert "cxrdx predict: skipped gone.png: broken link" in err
    assert "1 sub-folder(s) (sub) not searched; add --recursive" in err
    table = pd.read_csv(out)
    assert sorted(table["Image Index"]) == ["'=HYPERLINK(1).png", "a.png", "b.tif", "new\nline.png"]
    code, printed, _ = run_cli(["predict", "--checkpoint", run_dir / "checkpoints" / "best.pt", "--device", "cpu", folder], capsys)
    assert code == 0
    assert len(printed.splitlines()) == 5 and "new\\nline.png" in printed


def test_predict_suggests_recursive_for_a_folder_of_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for sub in ("p1", "p2"):
        (tmp_path / sub).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / sub / "x.png")
    code, _, err = run_cli(["predict", "--checkpoint", tmp_path / "missing.pt", tmp_path], capsys)
    assert_one_line_error(code, err, "no image files in", "add --recursive to look in its 2 sub-folder(s) (p1, p2)")


def test_csv_and_table_escaping() -> None:
    assert [csv_safe(n) for n in ("=1+2", "+a", "-a", "@a", "\tx", "a=b", "")] == ["'=1+2", "'+a", "'-a", "'@a", "'\tx", "a=b", ""]
    assert printable("a\nb\tc\x1b[31m é") == "a\\nb\\tc\\x1b[31m é"


def test_a_very_lopsided_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"wide\.png: not enough memory to resize the 50,000,000 x 1 pixel image to 64 x 64"):
        resize_square(np.zeros((1, 50_000_000), np.uint8), 64, "wide.png")


# --- compare, calibrate -------------------------------------------------------------------------------------


def test_compare_names_runs_after_their_run_folders(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    names = [f"{i:08d}_000.png" for i in range(60)]
    labels = pd.DataFrame((rng.random((60, 14)) < 0.3).astype(int), columns=list(FINDINGS)).assign(**{"Image Index": names})
    for run in ("alpha", "beta"):
        folder = tmp_path / "runs" / run / "eval"
        folder.mkdir(parents=True)
        evaluation.write_predictions(folder / "predictions.csv", names, rng.random((60, 14)))
        labels.to_csv(folder / "labels.csv", index=False)
        (folder / "metrics.json").write_text(json.dumps({"settings": {"checkpoint": f"runs/{run}/checkpoints/best.pt"}}))
    code, printed, _ = run_cli(["compare", tmp_path / "runs" / "alpha" / "eval", tmp_path / "runs" / "beta" / "eval"], capsys)
    assert code == 0
    assert re.search(r"\| alpha +\| beta +\|", printed)
    assert "runs/alpha" not in printed and "eval" not in printed


def test_calibrate_without_options_does_both(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "calibrated.pt"
    code, _, _ = run_cli(["calibrate", "--checkpoint", run_dir / "checkpoints" / "best.pt", "--out", target, "--quiet"], capsys)
    assert code == 0
    ckpt = load_checkpoint(target)
    assert ckpt.temperature is not None and ckpt.thresholds != [0.5] * 14
    assert ckpt.val_metrics["calibration"] == {"split": "val", "thresholds": "youden", "temperature": True}


def test_calibrate_warns_of_temperatures_at_their_bounds(run_dir: Path, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture) -> None:
    from cxrdx import metrics

    monkeypatch.setattr(metrics, "fit_temperature", lambda y, p: np.array([20.0] + [1.0] * 12 + [0.05]))
    code, _, err = run_cli(
        ["calibrate", "--checkpoint", run_dir / "checkpoints" / "best.pt", "--temperature", "--out", tmp_path / "c.pt", "--quiet"], capsys
    )
    assert code == 0
    assert "temperature at the limit of [0.05, 20] for Atelectasis (20), Pneumothorax (0.05)" in err


# --- explain, localize, download, help ---------------------------------------------------------------------


def test_finding_names_in_any_case_checked_before_loading(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert resolve_finding("pleural thickening") == "Pleural_Thickening" and resolve_finding("EFFUSION") == "Effusion"
    code, _, err = run_cli(
        ["explain", "--checkpoint", tmp_path / "missing.pt", "--finding", "efusion", "--out", tmp_path / "o", "x.png"], capsys
    )
    assert_one_line_error(code, err, "unknown finding 'efusion'; did you mean Effusion?")
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(image)
    code, _, err = run_cli(
        [
            "explain",
            "--checkpoint",
            run_dir / "checkpoints" / "best.pt",
            "--finding",
            "effusion",
            "--method",
            "gradcam",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            tmp_path / "maps",
            image,
        ],
        capsys,
    )
    assert code == 0 and err == ""  # --quiet: no progress bar
    assert (tmp_path / "maps" / "Effusion" / "x.gradcam.png").is_file()


def test_localize_says_where_the_boxed_images_are(run_dir: Path, phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    split = read_split(run_dir / "split.csv")
    train = list(split.index[split.to_numpy() == "train"][:4])
    boxes = tmp_path / "boxes.csv"
    pd.DataFrame({"Image Index": train, "Finding Label": "Mass", "x": 1, "y": 1, "w": 8, "h": 8}).to_csv(boxes, index=False)
    code, _, err = run_cli(
        [
            "localize",
            "--checkpoint",
            run_dir / "checkpoints" / "best.pt",
            "--data-dir",
            phantom_dir,
            "--boxes",
            boxes,
            "--split",
            "test",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert_one_line_error(code, err, "none of the 4 boxed image(s) is in the 'test' split", "(4 in train)")


def test_offline_download_fails_at_once(monkeypatch, tmp_path: Path) -> None:
    from cxrdx.data import download

    def offline(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))

    def no_sleep(seconds: float) -> None:
        raise AssertionError("an offline download must not wait and retry")

    monkeypatch.setattr(download.urllib.request, "urlopen", offline)
    monkeypatch.setattr(download.time, "sleep", no_sleep)
    with pytest.raises(CxrdxError, match="cannot resolve example.org .*connect this machine to the internet"):
        download.fetch("https://example.org/a.tar.gz", tmp_path / "a.tar.gz", progress=False)


def test_help_speaks_to_users_and_shows_defaults(capsys: pytest.CaptureFixture) -> None:
    for argv, needle in ((["serve", "--help"], "(default: 8000)"), (["split", "--help"], "(default: 0)"), (["--help"], "Multi-label")):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        printed = capsys.readouterr().out
        assert needle in printed and "cxrdx.report_html" not in printed and "thin argument parsing" not in printed


def test_a_system_error_midway_is_one_line(monkeypatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import errno

    import cxrdx.data.phantoms

    def disk_full(out, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(out) / "images" / "x.png"))

    monkeypatch.setattr(cxrdx.data.phantoms, "generate_phantoms", disk_full)
    code, _, err = run_cli(["phantoms", "--out", tmp_path / "p"], capsys)
    assert code == 1 and err == f"cxrdx phantoms: error: {tmp_path / 'p' / 'images' / 'x.png'}: No space left on device\n"


def test_library_parameters_are_named_as_options(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run_cli(
        ["explain", "--checkpoint", tmp_path / "missing.pt", "--method", "gradcm", "--out", tmp_path / "o", "x.png"], capsys
    )
    assert_one_line_error(code, err, "cxrdx explain: error: --method gradcm: unknown method; did you mean gradcam or xgradcam?")
    code, _, err = run_cli(["localize", "--checkpoint", tmp_path / "missing.pt", "--methods", "groupcam", "layer-cam"], capsys)
    assert_one_line_error(code, err, "--methods layer-cam: unknown method; did you mean layercam")
