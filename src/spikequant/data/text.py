"""Text data: WikiText-2 from a local folder (or the hub), C4 from the hub, or any local text file.

Texts are tokenized once into a long id sequence; evaluation cuts it into non-overlapping windows and
calibration samples random windows with a seeded generator. Every text carries a sha256 fingerprint
that reports record.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from spikequant.errors import DataError

DATA_ENV = "SPIKEQUANT_DATA_DIR"

# split -> file name in a local WikiText-2 folder. Calibration uses the validation split so that
# nothing we calibrate on is ever evaluated.
WIKITEXT2_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.tokens", "train": "wiki.train.raw"}
DATASETS = ("wikitext2", "c4")


@dataclass(frozen=True)
class Text:
    name: str  # e.g. "wikitext2:test" or a file path
    text: str
    source: str  # where it was read from

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def _wikitext_dir(data_dir: str | Path | None) -> Path | None:
    """Resolve the WikiText-2 folder from the flag or ``$SPIKEQUANT_DATA_DIR``; None if neither is set."""
    given = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not given:
        return None
    root = Path(given)
    if not root.is_dir():
        where = "--data-dir" if data_dir is not None else f"${DATA_ENV}"
        raise DataError(f"data directory not found: {given} (from {where})")
    # Accept both the folder holding wikitext-2/ and the wikitext-2 folder itself.
    for cand in (root / "wikitext-2", root):
        if any((cand / f).exists() for f in WIKITEXT2_FILES.values()):
            return cand
    raise DataError(f"data directory {given} holds no WikiText-2 files ({', '.join(WIKITEXT2_FILES.values())})")


def load_text(dataset: str, split: str = "test", data_dir: str | Path | None = None) -> Text:
    """Load an evaluation or calibration text.

    ``dataset`` is ``wikitext2``, ``c4`` or a path to a local text file. For WikiText-2 a local folder
    (``data_dir`` or ``$SPIKEQUANT_DATA_DIR``) wins; without one, the hub copy is used via ``datasets``.
    """
    if dataset == "wikitext2":
        if split not in WIKITEXT2_FILES:
            raise DataError(f"unknown wikitext2 split {split!r}; choose from {', '.join(WIKITEXT2_FILES)}")
        folder = _wikitext_dir(data_dir)
        if folder is not None:
            path = folder / WIKITEXT2_FILES[split]
            if not path.exists():
                raise DataError(f"{path} not found (wikitext2 {split} split)")
            return Text(f"wikitext2:{split}", path.read_text(encoding="utf-8"), str(path))
        return _hub_wikitext2(split)
    if dataset == "c4":
        return _hub_c4(split)
    path = Path(dataset)
    if path.is_file():
        return Text(str(path), path.read_text(encoding="utf-8"), str(path))
    raise DataError(f"unknown dataset {dataset!r}: not one of {', '.join(DATASETS)} and not a file")


def _require_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"no local data: pass --data-dir or set ${DATA_ENV}, or pip install 'spikequant[hub]' to use the hub"
        ) from None
    return datasets


def _hub_wikitext2(split: str) -> Text:
    datasets = _require_datasets()
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
    except Exception as e:  # network errors come in many types
        raise DataError(f"could not fetch wikitext2 from the hub ({type(e).__name__}); pass --data-dir") from None
    return Text(f"wikitext2:{split}", "\n\n".join(ds["text"]), "hub:wikitext/wikitext-2-raw-v1")


def _hub_c4(split: str) -> Text:
    datasets = _require_datasets()
    files = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
    split = "validation" if split == "test" else split
    try:
        ds = datasets.load_dataset("allenai/c4", data_files={split: files[split]}, split=split)
    except Exception as e:
        raise DataError(f"could not fetch c4 from the hub ({type(e).__name__})") from None
    return Text(f"c4:{split}", "\n\n".join(ds["text"][:3000]), "hub:allenai/c4")


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids (no special tokens added)."""
    ids = tokenizer(text.text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (the paper protocol), shape (N, seqlen)."""
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be >= 1, got {max_windows}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def calibration_windows(ids: torch.Tensor, seqlen: int, num_samples: int, seed: int) -> torch.Tensor:
    """``num_samples`` random windows of ``seqlen`` tokens; the same seed gives the same windows."""
    if ids.numel() <= seqlen:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (num_samples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
