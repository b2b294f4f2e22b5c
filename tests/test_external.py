"""Other datasets end to end: prepare a cache that keeps unlabelled findings NaN, evaluate on it,
the generalisation table of `compare --external`, and the subgroup tables of `evaluate`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import run_checkpoint
from PIL import Image
from scipy import stats as sps

from cxrdx import external, stats, subgroups
from cxrdx.cli import main
from cxrdx.data.cache import open_cache
from cxrdx.findings import FINDINGS

CHEXPERT_HEADER = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
    "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
    "Fracture,Support Devices\n"
)
ROOT = "CheXpert-v1.0-small"


def png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def chexpert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four CheXpert images: one lateral, blanks (not mentioned), an uncertain -1 and a 'No Finding' row."""
    root = tmp_path_factory.mktemp("chexpert") / ROOT
    rows = [
        "train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,,,,,,0.0,,,,1.0",
        "train/patient00001/study1/view2_lateral.jpg,Female,68,Lateral,,1.0,,,,,,,,,,,,,",
        "train/patient00002/study1/view1_frontal.jpg,Male,45,Frontal,PA,,,-1.0,1.0,,,,,,,1.0,,,",
        "train/patient00003/study1/view1_frontal.jpg,Male,83,Frontal,PA,,,1.0,,,,,,,,0.0,,,",
    ]
    root.mkdir()
    (root / "train.csv").write_text(CHEXPERT_HEADER + "".join(f"{ROOT}/{r}\n" for r in rows))
    (root / "valid.csv").write_text(CHEXPERT_HEADER)
    for i, row in enumerate(rows):
        png(root / row.split(",")[0], i)
    return root.parent


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hospital's export: 24 images of 12 patients labelling Effusion and Cardiomegaly (one blank), nothing else."""
    root = tmp_path_factory.mktemp("hospital")
    lines = ["path,patient,view,sex,age,Effusion,Cardiomegaly"]
    for i in range(24):
        png(root / "img" / f"{i:03d}.png", 100 + i)
        cardio = "" if i == 5 else str((i // 2) % 2)
        lines.append(f"img/{i:03d}.png,P{i // 2},{'AP' if i % 3 else 'PA'},{'F' if i % 2 else 'M'},{30 + 3 * i},{i % 2},{cardio}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def csv_cache(csv_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("csvcache") / "cache"
    assert main(["prepare", "--dataset", "csv", "--data-dir", str(csv_dir), "--out", str(out), "--size", "64", "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(phantom_cache: Path, phantom_split: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny model 'trained' on the phantom cache, with the run's split.csv beside it."""
    import shutil

    run = tmp_path_factory.mktemp("run")
    shutil.copy(phantom_split, run / "split.csv")
    return run_checkpoint(run, phantom_cache)


def evaluate(*args: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # findings without positives on tiny sets
        assert main(["evaluate", *args, "--quiet"]) == 0


# --- prepare ---------------------------------------------------------------------------------------


def test_prepare_chexpert_keeps_unlabelled_findings_nan(chexpert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cache"
    assert main(["prepare", "--dataset", "chexpert", "--data-dir", str(chexpert_dir), "--out", str(out), "--size", "16", "--quiet"]) == 0
    assert "views left out: LATERAL 1" in capsys.readouterr().out
    cache = open_cache(out)
    assert cache.labels.dtype == np.float32 and cache.labels.shape == (3, 14)
    column = {f: cache.labels[:, FINDINGS.index(f)] for f in FINDINGS}
    # No Finding = 1 makes the blank pathologies 0; uncertain -1 is ignored; unmentioned is NaN; Nodule is never labelled
    assert column["Effusion"][0] == 0 and column["Effusion"][1] == 1 and column["Effusion"][2] == 0
    assert column["Cardiomegaly"][0] == 0 and np.isnan(column["Cardiomegaly"][1]) and column["Cardiomegaly"][2] == 1
    assert np.isnan(column["Edema"][1:]).all() and np.isnan(column["Nodule"]).all()
    index = cache.index
    assert index["dataset"].tolist() == ["chexpert"] * 3 and index["Patient Gender"].tolist() == ["F", "M", "M"]
    assert index["View Position"].tolist() == ["AP", "PA", "PA"] and index["Patient Age"].tolist() == [68, 45, 83]
    assert json.loads((out / "meta.json").read_text())["dataset"] == "chexpert"
    every = tmp_path / "every"  # --views all keeps the lateral image; an unknown option is named
    assert (
        main(
            [
                "prepare",
                "--dataset",
                "chexpert",
                "--data-dir",
                str(chexpert_dir),
                "--out",
                str(every),
                "--size",
                "16",
                "--quiet",
                "--views",
                "all",
                "--uncertain",
                "positive",
            ]
        )
        == 0
    )
    every_cache = open_cache(every)
    assert len(every_cache) == 4 and every_cache.labels[2, FINDINGS.index("Cardiomegaly")] == 1
    assert (
        main(["prepare", "--dataset", "chexpert", "--data-dir", str(chexpert_dir), "--out", str(tmp_path / "x"), "--option", "colour=red"])
        == 2
    )
    assert "colour" in capsys.readouterr().err


def test_prepare_generic_csv(csv_cache: Path) -> None:
    cache = open_cache(csv_cache)
    assert len(cache) == 24 and cache.size == 64
    effusion, cardio = cache.labels[:, FINDINGS.index("Effusion")], cache.labels[:, FINDINGS.index("Cardiomegaly")]
    assert effusion.tolist() == [i % 2 for i in range(24)]
    assert np.isnan(cardio[5]) and np.nansum(cardio) == 12
    others = [k for k, f in enumerate(FINDINGS) if f not in ("Effusion", "Cardiomegaly")]
    assert np.isnan(cache.labels[:, others]).all()
    assert set(cache.index["Patient ID"]) == {f"P{i}" for i in range(12)} and cache.index["Patient Age"].max() == 99


def test_an_old_cache_with_integer_labels_still_opens(phantom_cache: Path, phantom_dir: Path) -> None:
    from cxrdx.data.metadata import read_metadata

    cache = open_cache(phantom_cache)
    expected = read_metadata(phantom_dir / "Data_Entry_2017.csv").set_index("Image Index").loc[cache.index["Image Index"]]
    assert cache.labels.dtype == np.float32 and not np.isnan(cache.labels).any()
    assert np.array_equal(cache.labels, expected[list(FINDINGS)].to_numpy(np.float32))


def test_patient_split_counts_only_positives() -> None:
    from cxrdx.data.splits import make_split

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (60, 14)).astype(float)
    labels[rng.random((60, 14)) < 0.3] = np.nan
    table = pd.DataFrame(labels, columns=list(FINDINGS)).assign(
        **{"Image Index": [f"{i}.png" for i in range(60)], "Patient ID": np.arange(60) // 3}
    )
    zeros = table.fillna(0)  # a NaN label is no positive, as a 0 is not
    assert make_split(table, "patient", seed=1).equals(make_split(zeros, "patient", seed=1))


# --- evaluate and compare on an external set --------------------------------------------------------


def test_evaluate_on_an_external_cache_and_the_generalisation_table(
    checkpoint: Path, csv_cache: Path, csv_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    internal, outside, raw = tmp_path / "internal", tmp_path / "hospital", tmp_path / "raw"
    evaluate("--checkpoint", str(checkpoint), "--out", str(internal))
    evaluate("--checkpoint", str(checkpoint), "--cache", str(csv_cache), "--out", str(outside))
    result = json.loads((outside / "metrics.json").read_text())
    assert result["settings"]["split"] == "all" and result["settings"]["images"] == 24  # not the run's test split
    per = result["per_finding"]
    assert per["Nodule"]["auroc"] is None and per["Nodule"]["images"] == 0
    assert per["Effusion"]["images"] == 24 and per["Cardiomegaly"]["images"] == 23 and per["Cardiomegaly"]["positives"] == 12
    assert "Nodule: no labelled images" in " ".join(result["notes"])
    labels = pd.read_csv(outside / "labels.csv")
    assert labels["Nodule"].isna().all() and labels["Cardiomegaly"].isna().sum() == 1
    assert {"Patient Gender", "Patient Age", "View Position", "dataset"} <= set(labels.columns)
    assert (outside / "subgroups.csv").is_file() and (outside / "subgroup_gaps.md").is_file()
    again = subgroups.read_subgroups(outside)  # from the folder alone, as the report reads it
    written = pd.read_csv(outside / "subgroups.csv").set_index(["finding", "attribute", "group"])
    assert np.allclose(again.auroc["auroc"], written.loc[again.auroc.index, "auroc"], equal_nan=True)
    assert set(again.auroc.index.get_level_values("attribute")) == {"sex", "age", "view"}
    assert again.auroc.loc[("Effusion", "sex", "F"), "images"] == 12
    # the same images read from the files with --dataset give the same probabilities
    evaluate("--checkpoint", str(checkpoint), "--dataset", "csv", "--data-dir", str(csv_dir), "--out", str(raw))
    a = pd.read_csv(outside / "predictions.csv").set_index("Image Index")
    b = pd.read_csv(raw / "predictions.csv").set_index("Image Index").loc[a.index]
    assert np.allclose(a.to_numpy(), b.to_numpy(), atol=1e-6)

    capsys.readouterr()
    assert (
        main(["compare", str(internal), "--external", str(outside), "--names", "phantoms", "hospital", "--out", str(tmp_path / "cmp")]) == 0
    )
    printed = capsys.readouterr().out
    assert "### Generalisation" in printed and "n/a (not labelled)" in printed
    table = pd.read_csv(tmp_path / "cmp" / "generalisation.csv").set_index("finding")
    ours = external.read_set(outside)
    assert table.loc["Effusion", "hospital AUROC"] == pytest.approx(ours.auc[FINDINGS.index("Effusion")])
    assert np.isnan(table.loc["Nodule", "hospital AUROC"]) and np.isnan(table.loc["Nodule", "hospital - phantoms"])
    diff = table.loc["Effusion", "hospital AUROC"] - table.loc["Effusion", "phantoms AUROC"]
    assert table.loc["Effusion", "hospital - phantoms"] == pytest.approx(diff)
    assert main(["compare", str(internal), str(internal), "--external", str(outside)]) == 2  # one internal RUN


def test_generalisation_matches_delong() -> None:
    rng = np.random.default_rng(3)
    y_in, y_out = rng.integers(0, 2, (300, 3)).astype(float), rng.integers(0, 2, (200, 3)).astype(float)
    p_in = np.clip(0.5 + 0.3 * (y_in - 0.5) + rng.normal(0, 0.25, y_in.shape), 0, 1)
    p_out = np.clip(0.5 + 0.1 * (y_out - 0.5) + rng.normal(0, 0.25, y_out.shape), 0, 1)
    y_out[:, 2] = np.nan  # the external set does not label the third finding
    y_out[:50, 1] = np.nan  # nor the second on a quarter of its images
    names = ["A", "B", "C"]
    g = external.generalisation(external.score_set("in", y_in, p_in), [external.score_set("out", y_out, p_out)], names)
    auc_in, cov_in = stats.delong_covariance(y_in, p_in)
    for k, rows in ((0, slice(None)), (1, slice(50, None))):
        auc_out, cov_out = stats.delong_covariance(y_out[rows, k : k + 1], p_out[rows, k : k + 1])
        diff, se = auc_out[0, 0] - auc_in[0, k], np.sqrt(cov_out[0, 0, 0] + cov_in[k, 0, 0])
        assert g.diff[0, k] == pytest.approx(diff)
        assert (g.low[0, k], g.high[0, k]) == pytest.approx((diff - 1.959964 * se, diff + 1.959964 * se))
        assert g.p[0, k] == pytest.approx(2 * sps.norm.sf(abs(diff) / se))
    assert np.isnan(g.diff[0, 2]) and np.isnan(g.p[0, 2])
    table = external.generalisation_table(g)
    assert table.display.loc["C", "out AUROC (95% CI)"] == external.NOT_LABELLED
    assert table.display.loc["C", "out − in (95% CI)"] == "n/a"
    assert table.data.loc["Mean", "out - in"] == pytest.approx(g.diff[0, :2].mean())
    assert any("out does not label C" in n for n in table.notes)
    low, high = stats.normal_ci(auc_in[0, 0], cov_in[0, 0, 0])
    assert table.display.loc["A", "in AUROC (95% CI)"] == f"{auc_in[0, 0]:.3f} ({low:.3f}, {high:.3f})"


# --- subgroups -------------------------------------------------------------------------------------


def test_subgroups_on_the_phantom_cache(phantom_cache: Path) -> None:
    cache = open_cache(phantom_cache)
    rng = np.random.default_rng(0)
    y = cache.labels.astype(float)
    probs = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.3, y.shape), 0, 1)
    meta = cache.index[["Patient Gender", "Patient Age", "View Position"]]
    result = subgroups.subgroup_auroc(y, probs, meta)
    table = result.auroc.sort_index()  # lexsorted for .xs
    assert set(table.index.get_level_values("attribute")) == {"sex", "age", "view"}  # one dataset: no dataset rows
    age = cache.index["Patient Age"].to_numpy()
    expected = {
        ("sex", "F"): (cache.index["Patient Gender"] == "F").to_numpy(),
        ("sex", "M"): (cache.index["Patient Gender"] == "M").to_numpy(),
        ("view", "PA"): (cache.index["View Position"] == "PA").to_numpy(),
        ("view", "AP"): (cache.index["View Position"] == "AP").to_numpy(),
        ("age", "<40"): age < 40,
        ("age", "40–59"): (age >= 40) & (age < 60),
        ("age", "60–79"): (age >= 60) & (age < 80),
        ("age", "≥80"): age >= 80,
    }
    k = FINDINGS.index("Effusion")
    for (attribute, group), mask in expected.items():
        if not mask.any():
            assert ("Effusion", attribute, group) not in table.index
            continue
        row = table.loc[("Effusion", attribute, group)]
        assert row["images"] == mask.sum() and row["positives"] == y[mask, k].sum()
        if 0 < y[mask, k].sum() < mask.sum():
            auc, low, high = stats.auroc_ci(y[mask, k], probs[mask, k])
            assert (row["auroc"], row["low"], row["high"]) == pytest.approx((auc, low, high))
    assert sum(table.xs(("Effusion", "sex"))["images"]) == len(cache)
    gap = result.gaps.loc[("Effusion", "age")]
    ages = table.xs(("Effusion", "age")).dropna(subset=["auroc"])
    assert gap["gap"] == pytest.approx(ages["auroc"].max() - ages["auroc"].min())
    assert (gap["high_group"], gap["low_group"]) == (ages["auroc"].idxmax(), ages["auroc"].idxmin())
    lo, hi = ages.loc[gap["low_group"]], ages.loc[gap["high_group"]]
    assert gap["p"] == pytest.approx(2 * sps.norm.sf(gap["gap"] / np.sqrt(lo["var"] + hi["var"])))
    shown = subgroups.subgroup_tables(result)
    assert [t.name for t in shown] == ["subgroups", "subgroup_gaps"]
    assert shown[1].display.loc[("Effusion", "age"), "groups"] == f"{gap['high_group']} vs {gap['low_group']}"


def test_subgroup_groups_of_bands_and_datasets() -> None:
    meta = pd.DataFrame(
        {
            "Patient Gender": ["F", "M", "", "f"],
            "Patient Age": [39.9, 40, np.nan, 80],
            "View Position": ["AP", "LATERAL", "PA", ""],
            "dataset": ["a", "a", "b", "b"],
        }
    )
    groups = subgroups.groups_of(meta)
    assert groups["sex"].tolist() == ["F", "M", "", "F"] and groups["age"].tolist() == ["<40", "40–59", "", "≥80"]
    assert groups["view"].tolist() == ["AP", "", "PA", ""] and groups["dataset"].tolist() == ["a", "a", "b", "b"]
    assert "dataset" not in subgroups.groups_of(meta.assign(dataset="a"))


# --- the demo's second site ------------------------------------------------------------------------


def test_second_site_phantoms_are_an_external_csv_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cxrdx.data.datasets import read_dataset
    from cxrdx.data.phantoms import SITE2_UNLABELLED, render_phantom, sample_specs

    assert main(["phantoms", "--site", "2", "--out", str(tmp_path / "site2"), "--n", "60", "--size", "48", "--seed", "0"]) == 0
    index = read_dataset("generic", tmp_path / "site2", views=None)
    table = index.table
    assert len(table) == 60 and not index.missing
    assert index.unlabelled() == list(SITE2_UNLABELLED)
    assert table["Patient ID"].str.startswith("site2-").all() and (table["View Position"] == "AP").mean() > 0.7
    site1, site2 = sample_specs(60, 0), sample_specs(60, 0, site=2)
    assert [s.labels for s in site1] != [s.labels for s in site2]  # other patients, not the first site's
    one, two = render_phantom(site1[0], 64)[0], render_phantom(site2[0], 64)[0]
    assert two[0].mean() < 20 and one[0].mean() > 20  # collimation: a dark top border at the second site only
    assert two.max() >= 240  # the side marker


# --- training on several caches --------------------------------------------------------------------


def test_training_on_two_caches_as_one(phantom_cache: Path, csv_cache: Path, tmp_path: Path) -> None:
    import pickle

    from cxrdx.config import load_config
    from cxrdx.data.cache import open_caches, pixel_stats
    from cxrdx.data.splits import read_split
    from cxrdx.engine import train

    nih, hospital = open_cache(phantom_cache), open_cache(csv_cache)
    both = open_caches([phantom_cache, csv_cache])
    n = len(nih)
    assert len(both) == n + 24 and both.images.shape == (n + 24, 64, 64)
    assert np.array_equal(both.images[n + 3], hospital.images[3]) and np.array_equal(
        both.images[[2, n + 5]], np.stack([nih.images[2], hospital.images[5]])
    )
    assert np.isnan(both.labels[n:, FINDINGS.index("Nodule")]).all() and not np.isnan(both.labels[:n]).any()
    assert both.index["Patient ID"].iloc[n] == "generic:P0" and both.index["Patient ID"].iloc[0].startswith("nih:")
    mean, _ = pixel_stats(both)
    assert mean == pytest.approx((pixel_stats(nih)[0] * n + pixel_stats(hospital)[0] * 24) / (n + 24))
    assert len(pickle.loads(pickle.dumps(both))) == n + 24  # DataLoader workers reopen both caches

    config = load_config(
        None,
        [
            f"data.caches=[{phantom_cache}, {csv_cache}]",
            f"out={tmp_path / 'run'}",
            "data.input_size=32",
            "data.workers=0",
            "model.name=test_resnet",
            "optim.global_batch=32",
            "optim.epochs=1",
            "optim.lr=1e-3",
            "loss.name=wbce",
        ],
    )
    run = train(config, progress=False)
    split = read_split(run / "split.csv")
    assert len(split) == n + 24 and split.index.isin(hospital.index["Image Index"]).sum() == 24
    out = tmp_path / "eval"
    evaluate("--checkpoint", str(run / "checkpoints" / "best.pt"), "--out", str(out))  # the run's own caches: test split
    predicted = pd.read_csv(out / "predictions.csv")["Image Index"]
    assert set(predicted) == set(split.index[split == "test"])
