"""Row sources: hub datasets and local mirrors (schemas, splits, fingerprints and identities), and the synthetic
data in the hub schemas."""

from __future__ import annotations

import random

import pytest

from phi3v.data.conversation_files import read_conversations
from phi3v.data.sources import load_cauldron_splits
from phi3v.data.synthetic import (
    DOCVQA_MINI_FEATURES,
    write_cauldron,
    write_custom,
    write_docvqa,
)
from phi3v.errors import RecipeError

# --- hub splits and the_cauldron ------------------------------------------------------------------------------


@pytest.mark.parametrize("config, images_per_row", [("hateful_memes", 1), ("nlvr2", 2)])
def test_synthetic_cauldron_configs(tmp_path, config, images_per_row):
    write_cauldron(tmp_path, config, num_rows=12)
    train, held_out = load_cauldron_splits(str(tmp_path), config, eval_size=4, images_per_row=images_per_row)
    assert (train.indices, held_out.indices) == (list(range(4, 12)), [0, 1, 2, 3])
    assert train.where(4).endswith(f"(config {config}, split train) row 4")  # numbered as dataset[i]
    assert all(len(train.rows[i]["images"]) == images_per_row for i in train.indices)
    assert all(set(train.rows[i]["images"][0]) == {"bytes", "path"} for i in train.indices)  # not decoded
    assert not any(train.schema_problems(train.rows[i]) for i in train.indices)
    with pytest.raises(RecipeError, match="Lower --eval_size"):
        load_cauldron_splits(str(tmp_path), config, eval_size=12)


def test_cauldron_rows_with_the_wrong_image_count_are_reported(tmp_path):
    write_cauldron(tmp_path, "hateful_memes", num_rows=6)
    train, _ = load_cauldron_splits(str(tmp_path), "hateful_memes", eval_size=2, images_per_row=2)
    assert train.schema_problems(train.rows[3]) == ["holds 1 image(s), this recipe needs exactly 2"]


def test_offline_hub_ids_fail_fast_with_the_way_out(monkeypatch):
    from phi3v.data.sources import load_hub_dataset

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RecipeError, match="python -m phi3v.synthetic"):
        load_hub_dataset("nielsr/docvqa_1200_examples", None, "train", "--dataset_name_or_path", ["image"])


def test_local_folders_with_the_same_name_do_not_share_a_cache(tmp_path):
    """datasets alone would serve the second folder the first one's cached rows."""
    from phi3v.data.sources import load_hub_dataset

    write_docvqa(tmp_path / "a" / "docvqa", num_train=3, num_test=1)
    write_docvqa(tmp_path / "b" / "docvqa", num_train=5, num_test=1)
    sizes = [len(load_hub_dataset(str(tmp_path / x / "docvqa"), None, "train", "--flag", ["image"])) for x in "ab"]
    assert sizes == [3, 5]
    write_docvqa(tmp_path / "a" / "docvqa", num_train=4, num_test=1)  # rewritten in place
    assert len(load_hub_dataset(str(tmp_path / "a" / "docvqa"), None, "train", "--flag", ["image"])) == 4


def test_a_local_folder_rewritten_in_place_gets_a_new_fingerprint(tmp_path):
    """datasets' own fingerprint names the folder, not what it holds: a mirror regenerated with other rows under
    the same file names kept it, and the validation cache then served the old folder's result."""
    from phi3v.data.sources import load_hub_source

    def fingerprint() -> str:
        return load_hub_source(str(tmp_path / "docvqa"), None, "train", "--flag", ["image"]).fingerprint

    write_docvqa(tmp_path / "docvqa", num_train=4, num_test=1, seed=1)
    first = fingerprint()
    assert fingerprint() == first  # read again, unchanged
    write_docvqa(tmp_path / "docvqa", num_train=4, num_test=1, seed=2)  # same names, other content
    assert fingerprint() != first


def test_a_copy_of_the_data_has_the_same_identity_but_is_validated_again(tmp_path):
    """A checkpoint records the identity (names and sizes, a file's text): a copy made later, elsewhere, resumes;
    the validation cache follows the stricter fingerprint (modification times too)."""
    import shutil

    from phi3v.data.sources import load_hub_source

    write_docvqa(tmp_path / "docvqa", num_train=4, num_test=1)
    write_custom(tmp_path / "custom", num_train=4, num_eval=1)
    for name in ("docvqa", "custom"):
        shutil.copytree(tmp_path / name, tmp_path / "copy" / name, copy_function=shutil.copyfile)  # new times
    (tmp_path / "docvqa" / ".git").mkdir()
    (tmp_path / "docvqa" / ".git" / "index").write_text("not data")  # hidden: not part of the data
    hub = [
        load_hub_source(str(root / "docvqa"), None, "train", "--flag", ["image"])
        for root in (tmp_path, tmp_path / "copy")
    ]
    files = [
        read_conversations(root / "custom" / "train.jsonl", root / "custom") for root in (tmp_path, tmp_path / "copy")
    ]
    for original, copy in (hub, files):
        assert original.identity == copy.identity and original.fingerprint != copy.fingerprint


def test_hub_row_schema_problems(tmp_path):
    """An empty answer list would crash the builder hours into a run; the row check names it."""
    from phi3v.data.sources import load_hub_source
    from phi3v.data.synthetic import _write_readme, _write_split, docvqa_mini_row

    rng = random.Random(0)
    rows = [docvqa_mini_row(i, rng) for i in range(4)]
    rows[2]["answers"] = []
    rows[3]["query"] = {"de": "Was?"}
    _write_split(rows, DOCVQA_MINI_FEATURES, tmp_path / "data" / "train-00000-of-00001.parquet")
    _write_readme(tmp_path, {"default": ["train"]})
    source = load_hub_source(str(tmp_path), None, "train", "--flag", ["image", "query", "answers"])
    assert [source.schema_problems(source.rows[i]) for i in range(4)] == [
        [],
        [],
        ["answers must be a non-empty list of strings"],
        ["query needs a string 'en'"],
    ]
