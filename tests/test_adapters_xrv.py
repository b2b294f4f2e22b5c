"""The adapters on the real label files torchxrayvision ships, counted against its own dataset classes.

torchxrayvision's classes are built with the label CSVs and an empty image folder (they read images
only when indexed). Every difference between its labels and ours is asserted and explained here and
in docs/datasets.md.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxrdx.data.datasets import chexpert, mimic, padchest, rsna, vindr
from cxrdx.data.splits import make_split
from cxrdx.findings import FINDINGS

xrv = pytest.importorskip("torchxrayvision")
pytestmark = pytest.mark.slow
DATA = Path(xrv.__file__).parent / "data"
FRONTAL = ["PA", "AP"]


def xrv_labels(dataset, name: str) -> np.ndarray:
    return dataset.labels[:, dataset.pathologies.index(name)]


@pytest.fixture(scope="module")
def empty_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("no-images"))


def test_chexpert_train_labels_equal_torchxrayvision(empty_dir: str) -> None:
    theirs = xrv.datasets.CheX_Dataset(empty_dir, str(DATA / "chexpert_train.csv.gz"), views=FRONTAL, unique_patients=False)
    ours = chexpert.read_labels(DATA / "chexpert_train.csv.gz")
    assert len(ours) == 223_414
    assert ours["View Position"].value_counts().to_dict() == {"AP": 161_590, "LATERAL": 32_404, "PA": 29_420}
    frontal = ours[ours["View Position"].isin(FRONTAL)]
    assert len(frontal) == len(theirs) == 191_010
    # same rows in the same order, same 1 / 0 / NaN for every label both have
    for name in [*chexpert.TO_FINDING.values(), *chexpert.EXTRA_LABELS]:
        np.testing.assert_array_equal(frontal[name].to_numpy(np.float64), xrv_labels(theirs, name), err_msg=name)
    # what the labeller does not report is not labelled, never negative
    for name in ("Emphysema", "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening"):
        assert frontal[name].isna().all()
    assert (frontal["Effusion"] == 1).sum() == 76_894 and (frontal["Effusion"] == 0).sum() == 34_376
    assert ours["Patient ID"].nunique() == 64_540 and frontal["Patient ID"].nunique() == 64_534
    assert set(ours["Patient Gender"]) == {"M", "F", ""}
    # the patient-wise split of ChestX-ray14 works on the adapter's table as it is
    split = make_split(frontal, "patient").to_numpy()
    assert pd.Series(split).groupby(frontal["Patient ID"].to_numpy()).nunique().max() == 1
    assert abs((split == "test").mean() - 0.2) < 0.01


def test_padchest_labels_match_torchxrayvision_up_to_the_documented_terms(empty_dir: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = xrv.datasets.PC_Dataset(empty_dir, views=["PA", "AP", "AP Supine"], unique_patients=False)
    table = padchest.read_labels(DATA / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz")
    assert len(table) == 160_861
    assert table["View Position"].value_counts().to_dict() == {
        "PA": 91_728,
        "LATERAL": 49_579,
        "AP": 18_905,
        "COSTAL": 630,
        "EXCLUDE": 11,
        "UNK": 8,
    }
    # torchxrayvision also drops rows without labels, 21 broken files and patients under 10: take its rows
    ours = table.set_index("Image Index").loc[theirs.csv["ImageID"]]
    terms = theirs.csv["Labels"].map(lambda t: padchest.parse_terms(t, Path("labels"), 0)).to_numpy()
    uninformative = np.array([t <= padchest.UNINFORMATIVE for t in terms])
    assert uninformative.sum() == 4_301  # only 'unchanged' / 'exclude' / 'suboptimal study' / blank

    # terms torchxrayvision's substring match takes that are not the finding, and terms we add
    theirs_only = {
        "Effusion": {"pericardial effusion"},
        "Emphysema": {"subcutaneous emphysema"},
        "Infiltration": {"consolidation", "air bronchogram"},
        "Mass": {"soft tissue mass", "breast mass"},
        "Nodule": {"pseudonodule"},
    }
    ours_only = {"Effusion": {"hydropneumothorax", "empyema"}}
    fewer_positives = {}
    for name in FINDINGS:
        mine, their = ours[name].to_numpy(np.float64), xrv_labels(theirs, name)
        assert np.isnan(mine).tolist() == uninformative.tolist(), name
        assert (their[uninformative] == 0).all(), name  # torchxrayvision calls them negative
        for row in np.flatnonzero(~uninformative & (mine != their)):
            expected = theirs_only if their[row] == 1 else ours_only
            assert terms[row] & expected.get(name, set()), (name, sorted(terms[row]))
        fewer_positives[name] = int((their == 1).sum() - (mine == 1).sum())
    assert {k: v for k, v in fewer_positives.items() if v} == {
        "Effusion": 4,
        "Emphysema": 167,
        "Infiltration": 1_221,
        "Mass": 78,
        "Nodule": 1_390,
    }
    assert int((ours["Nodule"] == 1).sum()) == 2_545 and int((ours["Cardiomegaly"] == 1).sum()) == 9_795


def test_vinbigdata_labels_equal_torchxrayvision(empty_dir: str) -> None:
    theirs = xrv.datasets.VinDr_Dataset(empty_dir, str(DATA / "vinbigdata-train.csv.gz"))
    ours = vindr.read_annotations(DATA / "vinbigdata-train.csv.gz").set_index("Image Index").loc[theirs.csv["image_id"]]
    assert len(ours) == 15_000
    same = {
        "Atelectasis": "Atelectasis",
        "Cardiomegaly": "Cardiomegaly",
        "Consolidation": "Consolidation",
        "Effusion": "Effusion",
        "Infiltration": "Infiltration",
        "Pleural_Thickening": "Pleural_Thickening",
        "Pneumothorax": "Pneumothorax",
        "Fibrosis": "Pulmonary Fibrosis",
        "Nodule/Mass": "Nodule/Mass",
        "Lung Opacity": "Lung Opacity",
        "ILD": "ILD",
        "Aortic enlargement": "Aortic enlargement",
        "Calcification": "Calcification",
        "Other lesion": "Other Lesion",
    }
    for mine, their in same.items():
        np.testing.assert_array_equal(ours[mine].to_numpy(np.float64), xrv_labels(theirs, their), err_msg=mine)
    # Nodule/Mass cannot be split: absent -> both negative, present -> both unknown
    either = xrv_labels(theirs, "Nodule/Mass")
    for name in ("Nodule", "Mass"):
        assert ours[name].isna().to_numpy().tolist() == (either == 1).tolist()
        assert (ours[name][either == 0] == 0).all()
    # the challenge's file has no Edema, Emphysema, Pneumonia or Hernia class
    for name in ("Edema", "Emphysema", "Hernia", "Pneumonia"):
        assert ours[name].isna().all()
    assert (ours["Cardiomegaly"] == 1).sum() == 2_300
    majority = vindr.read_annotations(DATA / "vinbigdata-train.csv.gz", readers="majority")
    assert 0 < (majority["Cardiomegaly"] == 1).sum() < 2_300


def test_rsna_labels_equal_torchxrayvision() -> None:
    theirs = xrv.datasets.RSNA_Pneumonia_Dataset("unused", views=FRONTAL)
    ours = rsna.read_labels(DATA / "kaggle_stage_2_train_labels.csv.zip", DATA / "kaggle_stage_2_train_images_dicom_headers.csv.gz")
    assert len(ours) == len(theirs) == 26_684
    ours = ours.set_index("Image Index").loc[theirs.csv["patientId"]]
    for name in ("Pneumonia", "Lung Opacity"):
        np.testing.assert_array_equal(ours[name].to_numpy(np.float64), xrv_labels(theirs, name))
    assert (ours["Pneumonia"] == 1).sum() == 6_012
    assert ours["View Position"].value_counts().to_dict() == {"PA": 14_511, "AP": 12_173}
    assert pd.Series([f for f in FINDINGS if ours[f].isna().all()]).tolist() == [f for f in FINDINGS if f != "Pneumonia"]


def test_mimic_rule_matches_torchxrayvision_except_support_devices(tmp_path: Path) -> None:
    """torchxrayvision ships no MIMIC labels: both read the same small tables in the published format."""
    header = (
        "subject_id,study_id,Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,"
        "Lung Lesion,Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices\n"
    )
    (tmp_path / "chexpert.csv").write_text(
        header + "1,11,,,,,,,,,1.0,,,,,\n2,21,,-1.0,,1.0,,,,,,0.0,,,,1.0\n3,31,1.0,,0.0,,,,,,,,,-1.0,,\n"
    )
    (tmp_path / "metadata.csv").write_text(
        "dicom_id,subject_id,study_id,ViewPosition,StudyDate\na,1,11,PA,1\nb,2,21,AP,1\nc,3,31,PA,1\nd,3,31,LATERAL,1\n"
    )
    theirs = xrv.datasets.MIMIC_Dataset(
        str(tmp_path), str(tmp_path / "chexpert.csv"), str(tmp_path / "metadata.csv"), views=FRONTAL, unique_patients=False
    )
    ours = mimic.read_labels(tmp_path / "chexpert.csv", tmp_path / "metadata.csv")
    ours = ours[ours["View Position"].isin(FRONTAL)]
    for name in [*chexpert.TO_FINDING.values(), *chexpert.EXTRA_LABELS]:
        expected = xrv_labels(theirs, name)
        if name == "Support Devices":  # torchxrayvision zeroes it for No Finding too; the labeller does not
            assert np.isnan(ours[name].iloc[0]) and expected[0] == 0
            expected = np.r_[np.nan, expected[1:]]
        np.testing.assert_array_equal(ours[name].to_numpy(np.float64), expected, err_msg=name)
