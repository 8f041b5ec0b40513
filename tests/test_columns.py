"""A HF table's columns as items (dist_mtl.columns.ColumnDataset): images decoded per row, text
tokenized per row and padded per batch, and the bad rows of issue 17: a corrupt image, a null
text and a missing tokenizer each name their column or key; end to end a corrupt image exits 2
(no traceback), or is skipped and counted with ``data.skip_bad_examples``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from conftest import launch, write_config

from dist_mtl.columns import ColumnDataset
from dist_mtl.errors import DataError


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def image_table(path, rows: int = 48, corrupt: tuple[int, ...] = ()):
    """rows of 8x8 RGB images whose brightness gives ``label`` (2 classes) and a mask image
    (class 1 on the left half, 255 = unlabelled in the corner), saved with save_to_disk."""
    import datasets

    rng = np.random.default_rng(0)
    images, labels, masks = [], [], []
    for i in range(rows):
        level = int(rng.integers(0, 2))
        pixels = (rng.random((8, 8, 3)) * 100 + 120 * level).astype(np.uint8)
        mask = np.zeros((8, 8), np.uint8)
        mask[:, :4] = 1
        mask[0, 0] = 255
        images.append({"bytes": b"not a png" if i in corrupt else _png(pixels), "path": None})
        labels.append(level)
        masks.append({"bytes": _png(mask), "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"), "mask": datasets.Image()})
    datasets.Dataset.from_dict({"image": images, "label": labels, "mask": masks}, features=features).save_to_disk(str(path))
    return str(path)


def tokenizer_dir(path, texts: list[str]) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(path))
    return str(path)


def test_images_and_masks_become_tensors_and_flip_together(tmp_path):
    data = ColumnDataset(image_table(tmp_path / "t"), inputs="image", targets={"label": "label", "mask": "mask"},
                         mean=[0.5] * 3, std=[0.25] * 3, hflip=True)
    torch.manual_seed(0)
    items = [data[3] for _ in range(8)]
    shapes = {(tuple(i["inputs"].shape), i["inputs"].dtype, tuple(i["mask"].shape), i["mask"].dtype) for i in items}
    assert shapes == {((3, 8, 8), torch.float32, (8, 8), torch.int64)}
    flipped = [i for i in items if i["mask"][0, -1] == -100]  # the unlabelled corner moved to the right
    kept = [i for i in items if i["mask"][0, 0] == -100]
    assert flipped and kept and len(flipped) + len(kept) == 8
    assert torch.equal(flipped[0]["inputs"], kept[0]["inputs"].flip(-1))
    assert int(items[0]["label"]) in (0, 1)


def test_a_corrupt_image_names_its_column_and_row(tmp_path):
    data = ColumnDataset(image_table(tmp_path / "t", corrupt=(5,)), inputs="image", targets=["label"])
    with pytest.raises(DataError, match=r"column 'image' row 5: cannot decode the image"):
        data[5]


def test_text_is_tokenized_per_row_padded_per_batch_and_a_null_text_is_named(tmp_path):
    import datasets

    texts = ["a red film", "the long dark night of the soul", None, "red"]
    table = datasets.Dataset.from_dict({"title": texts, "drama": [1, 0, 1, 0]})
    data = ColumnDataset(table, inputs="title", targets=["drama"],
                         tokenizer=tokenizer_dir(tmp_path / "tok", [t for t in texts if t]))
    batch = data.collate([data[0], data[1], data[3]])
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    assert ids.shape == (3, 7) and mask.sum(1).tolist() == [3, 7, 1]
    assert (ids[mask == 0] == data.tokenizer.pad_token_id).all()
    with pytest.raises(DataError, match=r"column 'title' is null in row 2"):
        data[2]


def test_a_missing_tokenizer_names_the_key(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict({"title": ["a"], "y": [1]})
    with pytest.raises(DataError, match=r"data.train.tokenizer: tokenizer directory not found: .*no-such-tokenizer$"):
        ColumnDataset(table, inputs="title", targets=["y"], tokenizer=str(tmp_path / "no-such-tokenizer"))


@pytest.mark.slow
def test_a_corrupt_image_in_training_exits_2_or_is_skipped_and_counted(tmp_path):
    path = image_table(tmp_path / "table", rows=48, corrupt=(7,))
    spec = {"class_path": "dist_mtl.columns.ColumnDataset",
            "init_args": {"path": path, "inputs": "image", "targets": ["label"], "hflip": True}}
    cfg = {"seed": 0, "data": {"source": "python", "train": spec, "num_workers": 1},
           "tasks": [{"name": "label", "kind": "classification", "target": "label", "num_classes": 2}],
           "model": {"encoder": {"class_path": "torch.nn.Flatten"},  # (B, 3, 8, 8) -> (B, 192)
                     "heads": {"label": {"class_path": "torch.nn.Linear", "init_args": {"in_features": 192, "out_features": 2}}}},
           "train": {"max_steps": 6, "batch_size": 16, "lr": 0.05},
           "log": {"wandb": "disabled", "every": 1, "progress": False}}
    config = write_config(tmp_path / "c.yaml", cfg)
    failed = launch(config, tmp_path / "failed")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-1500:]
    assert "data.train: item 7: column 'image' row 7: cannot decode the image" in failed.stderr
    skipped = launch(config, tmp_path / "skipped", ["data.skip_bad_examples=true"]).check()
    counted = [r["data/skipped"] for r in skipped.metrics() if "data/skipped" in r]
    assert counted[-1] == 2  # item 7 once per epoch: 6 steps x 16 = 96 items = 2 epochs of 48
