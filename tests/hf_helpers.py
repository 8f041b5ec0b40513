"""Datasets, heads and tiny model files for tests/test_hf_encoders.py (importable by class path as
``hf_helpers.<Name>`` when the tests directory is on the path). Nothing is downloaded: the BERT is
random-init from a config written here, the tokenizer is trained here with ``tokenizers``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from dist_mtl.text import encode_text, load_tokenizer

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sits", "flies", "the", "a", "big", "small", "fast",
         "slow", "and", "on", "mat", "tree", "sky"]
"""The vocabulary of the tiny texts (plus the special tokens)."""


def write_tokenizer(directory: Path) -> Path:
    """A word-level tokenizer over ``WORDS`` with BERT-style specials ([CLS] text [SEP]), saved as a
    ``PreTrainedTokenizerFast`` that ``AutoTokenizer.from_pretrained(directory)`` loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    vocab = {token: i for i, token in enumerate([*specials, *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    fast.save_pretrained(str(directory))
    return directory


def write_bert(directory: Path, vocab_size: int = len(WORDS) + 4) -> Path:
    """A tiny BERT config (hidden 16, 1 layer, 2 heads, no dropout) for random init."""
    from transformers import BertConfig

    BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=32, hidden_dropout_prob=0.0,
               attention_probs_dropout_prob=0.0).save_pretrained(str(directory))
    return directory


class TinyTexts(torch.utils.data.Dataset):
    """Texts of 2 to 9 random words, so lengths differ within every batch. Items: ``inputs`` (the
    text encoded, unpadded), ``topic`` (0/1: whether it mentions an animal), ``tag`` (per token:
    0 colour, 1 animal, 2 other; -100 on [CLS] and [SEP]) -- as dist_mtl.text documents."""

    def __init__(self, tokenizer: str, n: int = 48, seed: int = 0) -> None:
        self.tokenizer = load_tokenizer(tokenizer, "data.train.init_args.tokenizer")
        g = torch.Generator().manual_seed(seed)
        self.texts = []
        for _ in range(n):
            length = int(torch.randint(2, 10, (1,), generator=g))
            self.texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=g)))

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        words = self.texts[i].split()
        tags = torch.tensor([-100] + [0 if w in WORDS[:3] else 1 if w in WORDS[3:6] else 2 for w in words] + [-100])
        return {"inputs": encode_text(self.tokenizer, self.texts[i]), "tag": tags,
                "topic": int(any(w in WORDS[3:6] for w in words))}


class MaskedMeanHead(nn.Module):
    """(token features (B, L, D), inputs) -> (B, classes): the mean over the unpadded tokens."""

    def __init__(self, width: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(width, classes)

    def forward(self, features: torch.Tensor, inputs: dict) -> torch.Tensor:
        mask = inputs["attention_mask"].to(features.dtype).unsqueeze(-1)
        return self.lin((features * mask).sum(1) / mask.sum(1))


class TinyImages(torch.utils.data.Dataset):
    """``(3, 16, 16)`` images; ``bright`` (regression: the mean of the red channel) and ``shape``
    (3 classes from the sign pattern of two quadrants)."""

    def __init__(self, n: int = 48, seed: int = 0, size: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=g)
        half = size // 2
        self.bright = self.images[:, 0].mean((1, 2))
        self.shape = (self.images[:, 1, :half, :half].mean((1, 2)) > 0).long() + \
            (self.images[:, 2, half:, half:].mean((1, 2)) > 0).long()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"inputs": self.images[i], "bright": self.bright[i], "shape": self.shape[i]}
