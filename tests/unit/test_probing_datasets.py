"""The probing datasets, read from the sae-probes wheel's bundled .csv.zst files."""

import numpy as np
import pytest

from saeflow.h5io import InputFileError
from saeflow.probing import datasets


def test_the_113_binary_datasets_and_their_sizes():
    names = datasets.binary_datasets()
    assert len(names) == 113
    assert names[0] == "5_hist_fig_ismale" and names[-1] == "163_agnews_2"
    frame = datasets.table(names)
    # Reference B1: 334,092 prompts in all, 728-5000 rows each, every dataset >= 40% minority.
    n = frame["n"].to_numpy()
    assert n.sum() == 334_092
    assert n.min() == 728 and n.max() == 5000
    pos = frame["pos_frac"].to_numpy()
    assert (np.minimum(pos, 1 - pos) >= 0.4).all()
    assert frame["has_ood"].to_numpy().sum() == 8


def test_ood_sets_and_max_rows():
    for name in datasets.OOD_DATASETS:
        ood = datasets.load(name, ood=True)
        assert len(ood.prompts) == len(ood.y) > 0 and set(np.unique(ood.y)) <= {0, 1}
    first = datasets.load("161_agnews_0", max_rows=50)
    assert len(first.prompts) == 50 and first.prompts == datasets.load("161_agnews_0").prompts[:50]


def test_custom_unbalanced_csv_with_string_labels(tmp_path):
    path = tmp_path / "mine.csv"
    rows = ["prompt,target"] + [f"text {i},{'spam' if i % 10 == 0 else 'ham'}" for i in range(100)]
    path.write_text("\n".join(rows) + "\n")
    data = datasets.load("mine", {"mine": str(path)})
    # LabelEncoder order: 'ham' -> 0, 'spam' -> 1; 10% positives.
    assert data.y.sum() == 10 and data.y[0] == 1 and data.y[1] == 0
    frame = datasets.table(["mine"], {"mine": str(path)})
    assert frame.loc[0, "source"] == "custom" and frame.loc[0, "pos_frac"] == 0.1


def test_bad_inputs_name_the_file_or_dataset(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\na,1\n")
    with pytest.raises(InputFileError, match="bad.csv.*prompt"):
        datasets.read_csv(bad)
    three = tmp_path / "three.csv"
    three.write_text("prompt,target\na,1\nb,2\nc,3\n")
    with pytest.raises(InputFileError, match="3 distinct"):
        datasets.read_csv(three)
    with pytest.raises(KeyError, match="not one of the 113"):
        datasets.dataset_path("999_nope")
    with pytest.raises(KeyError, match="no OOD set"):
        datasets.dataset_path("161_agnews_0", ood=True)
