"""cxrdx.report: the self-contained HTML report over run folders, `cxrdx report`, and a real browser rendering it."""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxrdx import report, rundir
from cxrdx.cli import main
from cxrdx.config import config_from_dict
from cxrdx.findings import FINDINGS
from cxrdx.report import sections

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path("/tmp/cxrdx_report.png")
TABLE2_ROW = {"model": "resnet18", "params": 11177422, "macs": 35412992, "flops": 70825984, "resolution": "1*32*32", "note": ""}


def png_bytes(size: int = 24, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, 2 * size), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.Series, pd.DataFrame]:
    """A tiny prepared cache, its patient-wise split and its index."""
    from cxrdx.data.cache import open_cache, prepare_cache
    from cxrdx.data.phantoms import generate_phantoms
    from cxrdx.data.splits import make_split

    root = tmp_path_factory.mktemp("report_data")
    generate_phantoms(root / "phantoms", n=80, size=32, seed=0, tail_floor=0.1, progress=False)
    prepare_cache(root / "phantoms", root / "cache", size=32, progress=False)
    index = open_cache(root / "cache").index
    return root / "cache", make_split(index, strategy="patient", seed=0), index


def make_run(
    root: Path, name: str, dataset: tuple[Path, pd.Series, pd.DataFrame], signal: float, seed: int, skip: tuple[str, ...] = ()
) -> Path:
    """A run folder as train / evaluate / explain / localize leave it, with synthetic contents; `skip` drops parts."""
    from cxrdx.data.splits import write_split

    cache, split, index = dataset
    run = root / name
    run.mkdir(parents=True)
    config = {
        "name": name,
        "seed": seed,
        "data": {"cache": str(cache), "input_size": 32},
        "model": {"name": "resnet18"},
        "loss": {"name": name},
        "optim": {"epochs": 3, "global_batch": 8, "lr": 1e-3},
        "ema": {"enabled": False},
        "selection": {"weights": "raw"},
    }
    if "config" not in skip:
        rundir.write_config(run, config_from_dict(config))
    if "split" not in skip:
        write_split(split, rundir.split_path(run))
    if "metrics" not in skip:
        rows = [
            rundir.EpochRow(e, train_loss=1 / e, val_loss=1.1 / e, val_mean_auroc=0.5 + 0.1 * e, best=True, seconds=2.0) for e in (1, 2, 3)
        ]
        rundir.write_epochs(run, rows)
    if "curves" not in skip:
        rundir.curves_path(run).write_bytes(png_bytes(seed=seed))
    test = index[index["Image Index"].isin(split.index[split.to_numpy() == "test"])]
    names = test["Image Index"].tolist()
    y = test[list(FINDINGS)].to_numpy(np.uint8)
    probs = np.clip(signal * y + (1 - signal) * np.random.default_rng(seed).random(y.shape), 0, 1)
    if "eval" not in skip:
        folder = run / rundir.EVAL
        rundir.write_predictions(folder / rundir.PREDICTIONS, names, probs)
        meta = test[["Patient Gender"]].reset_index(drop=True)  # a subgroup column, as evaluate writes it
        rundir.write_labels(folder / rundir.LABELS, names, y, test["Patient ID"].to_numpy(), meta)
        per = {f: {"threshold": 0.5} for f in FINDINGS}
        rundir.write_eval_metrics(folder, rundir.EvalMetrics(settings={"split": "test", "images": len(names)}, per_finding=per))
        (folder / rundir.RELIABILITY).write_bytes(png_bytes(seed=seed + 1))
        (folder / rundir.ROC).write_bytes(png_bytes(seed=seed + 2))
    if "external" not in skip:  # the same images seen through another scanner: a weaker signal
        folder = rundir.external_eval_dir(run, "site2")
        rundir.write_predictions(folder / rundir.PREDICTIONS, names, np.clip(0.5 * probs + 0.25, 0, 1) * 0.6 + 0.2 * y)
        rundir.write_labels(folder / rundir.LABELS, names, y, test["Patient ID"].to_numpy())
    if "explain" not in skip:
        rows = []
        for i, (image, p) in enumerate(list(zip(names, probs))[:6]):
            k = int(np.argmax(p))
            png = run / rundir.EXPLAIN / FINDINGS[k] / f"{Path(image).stem}.groupcam.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            png.write_bytes(png_bytes(seed=100 + i))
            rows.append({"Image Index": image, "Finding": FINDINGS[k], "probability": p[k], "flat": False, "png": str(png), "npy": ""})
        rundir.write_explanations(run / rundir.EXPLAIN, pd.DataFrame(rows))
    if "localize" not in skip:
        summary = [
            {"method": m, "Finding": f, "n": n, "pointing_game": hit, "iou": iou, "flat": 0}
            for m, hit in (("groupcam", 0.75), ("gradcam", 0.5))
            for f, n, iou in (("Effusion", 4, 0.31), ("Mass", 2, 0.12), ("all", 6, 0.25))
        ]
        settings = {"split": "test", "threshold": 0.5, "threshold_mode": "relative", "tolerance": 0, "images": 5}
        rundir.write_localization(run / rundir.LOCALIZE, pd.DataFrame(summary), settings)
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, dataset) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root, "ours", dataset, 0.45, 1), make_run(root, "wbce", dataset, 0.2, 2, skip=("curves",))]


def seed_table2(out: Path) -> None:
    """Table 2's cache, so the tests need no forward pass (model_rows itself is tested below)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / report.TABLE2).write_text(json.dumps([TABLE2_ROW]))


@pytest.fixture(scope="module")
def page(runs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("report")
    seed_table2(out)
    extra = [("Demo timings", "<p id='demo-extra'>12 s in all</p>")]
    path = report.write_report(runs, out, extra_sections=extra, progress=False)
    return path, path.read_text(encoding="utf-8")


def test_html_renderer_aligns_numbers_merges_labels_and_escapes():
    index = pd.MultiIndex.from_tuples([("A<", "x"), ("A<", "Overall"), ("B", "y")], names=["Metric", "Finding"])
    display = pd.DataFrame({"m": ["0.912", "<0.001", "–"], "name": ["resnet18", "vit", "0.5"]}, index=index)
    text = report.html(report.Table("t", "T & t", display, display, ["note <1>"]), lambda key, col: "color:red" if key[-1] == "y" else "")
    assert "<figcaption>T &amp; t</figcaption>" in text and "<li>note &lt;1&gt;</li>" in text
    assert "<th scope='row' rowspan='2'>A&lt;</th>" in text and text.count("A&lt;") == 1
    assert "<th scope='col' class='num'>m</th><th scope='col'>name</th>" in text  # the header follows its column
    assert "<td class='num'>0.912</td><td>resnet18</td>" in text and "<td class='num'>&lt;0.001</td>" in text
    assert "<td style='color:red'>0.5</td>" in text and "<tr class='overall'>" in text
    wide = pd.DataFrame([["1", "2"]], columns=pd.MultiIndex.from_tuples([("ours", "a"), ("ours", "b")]), index=pd.Index(["f"], name="F"))
    assert "colspan='2' class='group'>ours</th>" in report.html(report.Table("w", "W", wide, wide))


def test_page_has_every_section_and_numbers(page: tuple[Path, str], runs: list[Path]):
    path, text = page
    for anchor in (
        "overview",
        "dataset",
        "models",
        "training",
        "performance",
        "significance",
        "roc",
        "calibration",
        "explanations",
        "localization",
        "external",
        "settings",
    ):
        assert f"<section id='{anchor}'>" in text and f"href='#{anchor}'" in text
    for table in (
        "table1",
        "table2",
        "table3",
        "table4",
        "delong",
        "anova",
        "table5_ours",
        "table5_wbce",
        "ece",
        "localization",
        "generalisation",
        "subgroups",
        "subgroup_gaps",
    ):
        assert f"id='table-{table}'" in text
    assert "id='demo-extra'" in text and text.index("Demo timings") < text.index("<section id='dataset'>")
    summary = json.loads((path.parent / report.SUMMARY).read_text())
    assert summary["best_model"] == "ours" and summary["models"]["ours"]["mean"] > summary["models"]["wbce"]["mean"]
    assert f"<strong class='big'>{summary['mean_auroc']['mean']:.3f}</strong>" in text
    assert "Leakage" in text or "No leakage" in text
    assert "resnet18" in text and "11.2 M" in text  # Table 2 from its cache
    assert "class='sig " in text and "Group-CAM" in text and "Pointing game" in text
    assert "correct" in text and "<pre>" in text and "<details>" in text
    assert "could not be built" not in text and "not usable" not in text


def test_page_is_self_contained(page: tuple[Path, str]):
    _, text = page
    assert not re.search(r"""(src|href)\s*=\s*['"]?\s*(https?:|//)""", text, re.I)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text and "url(" not in text
    sources = re.findall(r"<img src='([^']*)'", text)
    assert len(sources) >= 8 and all(s.startswith("data:image/png;base64,") for s in sources)
    # curves.png of "ours" embedded byte for byte; "wbce" had none and was re-plotted from metrics.jsonl
    assert sections.data_uri(png_bytes(seed=1)) in text
    assert "(from metrics.jsonl)" in text


def test_missing_parts_become_notes(tmp_path: Path, dataset, runs: list[Path]):
    bare = make_run(tmp_path, "bare", dataset, 0.3, 3, skip=("config", "split", "metrics", "curves", "eval", "explain", "localize"))
    path = report.write_report([bare], tmp_path / "out", progress=False)
    text = path.read_text()
    for phrase in (
        "no split.csv",
        "No config.yaml names a model",
        "No training curves",
        "No evaluation: run",
        "No explanations: run",
        "no localization: run",
        "No config.yaml in",
    ):
        assert phrase in text
    assert "No evaluated model" in text
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["best_model"] is None


def test_damaged_parts_become_notes(tmp_path: Path, runs: list[Path]):
    damaged = tmp_path / "damaged"
    shutil.copytree(runs[0], damaged)
    (damaged / "localize" / "localization.json").write_text("{not json")
    (damaged / "eval" / "labels.csv").write_text("Image Index,Atelectasis\nx.png,1\n")
    (damaged / "metrics.jsonl").write_text("garbage\n")
    (damaged / "curves.png").unlink()
    seed_table2(tmp_path / "out")
    text = report.write_report([damaged], tmp_path / "out", progress=False).read_text()
    assert "evaluation not readable" in text and "missing column(s)" in text
    assert "localization.json not usable" in text and "No training curves" in text and "could not be built" not in text
    # labels.csv is damaged: the panels are sorted with the labels of the run's prepared cache
    assert "Labels from the prepared cache" in text and "Correct predictions" in text and "No labels to sort" not in text

    config = rundir.read_config(damaged)
    config.data.cache = str(tmp_path / "gone")  # no cache: the NIH table, which names images as the phantoms do
    rundir.write_config(damaged, config)
    text = report.write_report([damaged], tmp_path / "out", progress=False).read_text()
    assert "Labels from the NIH label table shipped with cxrdx" in text and "No labels to sort" not in text
    panels = rundir.read_explanations(damaged / rundir.EXPLAIN)
    rundir.write_explanations(damaged / rundir.EXPLAIN, panels.assign(**{"Image Index": "elsewhere_" + panels["Image Index"]}))
    text = report.write_report([damaged], tmp_path / "out", progress=False).read_text()
    assert "No labels to sort the panels" in text and "Without a label to check" in text and "could not be built" not in text


def test_template_and_style_are_package_data_and_can_be_replaced(tmp_path: Path, runs: list[Path]):
    from importlib import resources

    packaged = resources.files("cxrdx.report") / "templates"
    assert (packaged / "report.html.j2").is_file() and ":root{" in (packaged / "report.css").read_text()
    mine = tmp_path / "brand"
    mine.mkdir()
    (mine / "report.css").write_text("body{color:#123456}")  # the packaged page with another style sheet
    seed_table2(tmp_path / "out")
    path = report.write_report([runs[0]], tmp_path / "out", progress=False, template_dir=mine)
    text = path.read_text()
    assert "<style>\nbody{color:#123456}\n</style>" in text and "--accent" not in text and "<section id='results'" not in text
    assert "id='table-table3'" in text
    (mine / "report.html.j2").write_text(
        "<html lang='de'><title>{{ title }}</title>{% for s in sections %}<h2>{{ s.title }}</h2>{{ s.body }}{% endfor %}</html>"
    )
    assert (
        main(["report", str(runs[0]), "--out", str(tmp_path / "out"), "--template-dir", str(mine), "--title", "Befund <1>", "--quiet"]) == 0
    )
    text = path.read_text()
    assert text.startswith("<html lang='de'><title>Befund &lt;1&gt;</title>") and "id='table-table3'" in text
    assert main(["report", str(runs[0]), "--template-dir", str(tmp_path / "nowhere")]) == 2


def test_runs_on_different_images_are_shown_one_by_one(tmp_path: Path, runs: list[Path]):
    other = tmp_path / "other"
    shutil.copytree(runs[1], other)
    predictions = pd.read_csv(other / "eval" / "predictions.csv").iloc[1:]
    predictions.to_csv(other / "eval" / "predictions.csv", index=False)
    seed_table2(tmp_path / "out")
    text = report.write_report([runs[0], other], tmp_path / "out", progress=False).read_text()
    assert "cannot be compared on the same test images" in text
    assert "id='table-delong'" not in text and text.count("id='table-table3'") == 2


def test_bootstrap_and_expert_label_results_are_shown(tmp_path: Path, runs: list[Path]):
    from cxrdx.evaluation import SplitPredictions, evaluate_predictions, read_labels, read_predictions

    run = tmp_path / "boot"
    shutil.copytree(runs[1], run)
    probs = read_predictions(run / "eval" / "predictions.csv")
    truth = read_labels(run / "eval" / "labels.csv").loc[probs.index]
    names = list(probs.index)
    yes = lambda flags: np.where(flags, "YES", "NO")  # noqa: E731
    expert = pd.DataFrame(
        {"Image Index": names, "Pneumothorax": yes(truth["Pneumothorax"] == 1), "Nodule or mass": yes(np.arange(len(names)) % 2 == 0)}
    )
    expert.to_csv(tmp_path / "expert.csv", index=False)
    preds = SplitPredictions(names, probs.to_numpy(), truth[list(FINDINGS)].to_numpy(np.uint8), truth["Patient ID"].to_numpy())
    with pytest.warns(Warning):  # tiny test split: some findings lack positives
        result = evaluate_predictions(preds, run / "eval", "boot", 0.5, n_bootstrap=30, expert_labels=tmp_path / "expert.csv")
    seed_table2(tmp_path / "out")
    text = report.write_report([run], tmp_path / "out", progress=False).read_text()
    start = text.index("<section id='performance'>")
    performance = text[start : text.index("</section>", start)]
    assert "id='table-bootstrap-boot'" in performance and "id='table-expert-boot'" in performance
    f = report.format_value
    boot = result["overall"]["auroc_bootstrap"]
    assert "patient-level bootstrap CIs: boot" in performance and "30 resamples of the test patients" in performance
    mean = result["overall"]["auroc"]
    assert (
        f"<th scope='row'>Overall (mean over findings)</th><td class='num'>{f(mean['mean'])}</td><td class='num'>{f(mean['low'])}–"
        f"{f(mean['high'])}</td><td class='num'>{f(boot['low'])}–{f(boot['high'])}</td>"
    ) in performance
    ci = lambda low, high: f"{f(low)}–{f(high)}" if report.DASH not in (f(low), f(high)) else report.DASH  # noqa: E731
    for k, row in result["per_finding"].items():
        if row["auroc_boot_low"] is None:
            assert f"<th scope='row'>{k}</th><td class='num'>–</td><td class='num'>–</td><td class='num'>–</td>" in performance
        else:  # a DeLong CI can be undefined (e.g. a single test positive) where the bootstrap has one
            assert (
                f"<th scope='row'>{k}</th><td class='num'>{f(row['auroc'])}</td><td class='num'>{ci(row['auroc_low'], row['auroc_high'])}"
                f"</td><td class='num'>{f(row['auroc_boot_low'])}–{f(row['auroc_boot_high'])}</td>"
            ) in performance
    assert any(row["auroc_boot_low"] is not None for row in result["per_finding"].values())
    for finding, row in result["expert_labels"].items():
        assert f"<th scope='row'>{finding}</th><td class='num'>{row['images']}</td>" in performance
        assert f"{f(row['expert_auroc'])} ({f(row['expert_low'])}, {f(row['expert_high'])})" in performance
    assert f(result["expert_labels"]["Nodule or mass"]["label_agreement"]) in performance


@pytest.mark.parametrize(
    "result",
    [
        {},
        {"overall": None},
        {"overall": {"auroc": {"mean": 0.7}}, "per_finding": {"Mass": {"threshold": 0.5}}},
        {"overall": {"auroc_bootstrap": {"low": 0.6}}, "per_finding": []},
        {"expert_labels": [1, 2]},
        {"expert_labels": {"Pneumothorax": {"images": 3}}},
        {"expert_labels": {"Pneumothorax": 1}},
        {"expert_labels": {}},
    ],
)
def test_missing_or_damaged_extras_show_nothing(result: dict):
    metrics = rundir.EvalMetrics.from_dict(result)
    assert report.tables.bootstrap_table("r", metrics) is None and report.tables.expert_labels_table("r", metrics) is None


def test_plain_evaluations_have_no_extra_tables(page: tuple[Path, str]):
    _, text = page
    assert "id='table-bootstrap" not in text and "id='table-expert" not in text


def test_model_rows_are_cached(tmp_path: Path):
    calls = []

    def measure(names: list[str], size: int) -> list[dict]:
        calls.append((names, size))
        if names == ["nonexistent"]:
            raise RuntimeError("no such model")
        return [{**TABLE2_ROW, "resolution": f"1*{size}*{size}"}]

    cache = tmp_path / report.TABLE2
    rows, notes = sections.model_rows([("resnet18", 32)], cache, measure)
    assert rows[0]["params"] == TABLE2_ROW["params"] and notes == [] and calls == [(["resnet18"], 32)]
    assert sections.model_rows([("resnet18", 32)], cache, measure)[0] == rows and len(calls) == 1
    rows, notes = sections.model_rows([("resnet18", 32), ("nonexistent", 32)], cache, measure)
    assert rows[0]["model"] == "resnet18" and len(rows) == 1 and "no such model" in notes[0]


def test_cli_report(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    seed_table2(tmp_path / "out")
    assert main(["report", str(runs[0]), "--names", "A", "--out", str(tmp_path / "out"), "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == str(tmp_path / "out" / "report.html") and lines[-2].startswith("model A: mean AUROC")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such run folder" in capsys.readouterr().err
    assert main(["report", str(runs[0]), "--names", "a", "b"]) == 2


def test_report_renders_in_chromium(page: tuple[Path, str]):
    if not CHROMIUM.exists() or shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (make browser / apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    path, _ = page
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            view = browser.new_page(viewport={"width": 1280, "height": 900})
            requests = []
            view.on("request", lambda r: requests.append(r.url))
            view.goto(path.as_uri())
            assert view.title() == "Chest X-ray diagnosis: report"
            broken = view.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")
            assert broken == 0 and view.evaluate("document.images.length") >= 8
            assert view.locator("table.sig-grid").count() == 2 and view.locator("td.sig.s3, td.sig.ns").count() > 0
            assert all(u.startswith(("file:", "data:")) for u in requests)
            view.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000
