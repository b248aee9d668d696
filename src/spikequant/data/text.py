"""Text data: WikiText-2 from a local folder (or the hub), C4 from the hub, or any local text file.

The protocol is the papers' (QuaRot ``fake_quant/data_utils.py``, paper A's ``PWIM/ppl_eval.py``):
WikiText-2 is ``"\n\n".join(rows)`` of the Hugging Face split, and a local ``wiki.*.raw`` /
``wiki.*.tokens`` file is turned into exactly that string (the original files hold one row per line,
empty rows as blank lines: :func:`wikitext_rows`). C4 is the first 1,100 documents of
``c4-validation.00000-of-00008`` joined with a space, cut to 256 windows. Texts are tokenized once with
the tokenizer's own special tokens (a BOS at the start where the tokenizer adds one); evaluation cuts the
ids into non-overlapping windows (the last partial one dropped) and calibration samples random windows
with a seeded generator. Every text carries a sha256 fingerprint that reports record.
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
# nothing we calibrate on is ever evaluated; that file is the tokenized variant, whose rare words are the
# literal string "<unk>" (Text.unk_share, recorded in every report's calibration entry).
WIKITEXT2_FILES = {"test": "wiki.test.raw", "validation": "wiki.valid.tokens", "train": "wiki.train.raw"}
DATASETS = ("wikitext2", "c4")


C4_DOCUMENTS = 1100  # QuaRot's get_c4_new: ' '.join(valdata[:1100]['text'])
C4_WINDOWS = 256  # ... then valenc[:, :256 * seqlen]


@dataclass(frozen=True)
class Text:
    name: str  # e.g. "wikitext2:test" or a file path
    text: str
    source: str  # where it was read from
    max_windows: int | None = None  # the protocol's cap on evaluation windows (C4: 256)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    @property
    def unk_share(self) -> float:
        """Share of whitespace-separated words that are the literal ``<unk>`` (5.5 % in
        ``wiki.valid.tokens``, the tokenized variant we calibrate on): reports state it."""
        words = self.text.split()
        return round(words.count("<unk>") / len(words), 4) if words else 0.0


def wikitext_rows(raw: str) -> list[str]:
    """The rows the Hugging Face ``wikitext`` dataset gives for a ``wiki.*.raw`` / ``wiki.*.tokens`` file:
    one per line, each keeping its ``\n``, whitespace-only lines as empty rows."""
    lines = raw.split("\n")
    rows = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    return [r if r.strip() else "" for r in rows]


def hub_join(rows: list[str]) -> str:
    """The evaluation string of both papers' code: ``"\n\n".join(dataset["text"])``."""
    return "\n\n".join(rows)


def is_wikitext_file(path: Path) -> bool:
    return path.name.startswith("wiki.") and path.suffix in (".raw", ".tokens")


def _read(path: Path) -> str:
    raw = path.read_text(encoding="utf-8")
    return hub_join(wikitext_rows(raw)) if is_wikitext_file(path) else raw


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
            return Text(f"wikitext2:{split}", _read(path), str(path))
        return _hub_wikitext2(split)
    if dataset == "c4":
        return _hub_c4(split)
    path = Path(dataset)
    if path.is_file():
        return Text(str(path), _read(path), str(path))
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
    if split == "validation":  # QuaRot's evaluation text
        return Text("c4:validation", " ".join(ds["text"][:C4_DOCUMENTS]), "hub:allenai/c4", C4_WINDOWS)
    return Text(f"c4:{split}", " ".join(ds["text"][:C4_DOCUMENTS]), "hub:allenai/c4")


def tokenize(tokenizer, text: Text) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, with the tokenizer's own special tokens (as
    ``tokenizer(text)`` in the papers' code: a BOS at the very start where the tokenizer adds one)."""
    ids = tokenizer(text.text, return_tensors="pt").input_ids[0]
    return ids


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None,
                 protocol_cap: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens from the start (the paper protocol), shape (N, seqlen).
    ``protocol_cap`` is the text's own cap (``Text.max_windows``; C4: 256), ``max_windows`` the user's."""
    if seqlen < 2:
        raise DataError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be >= 1, got {max_windows}")
    n = ids.numel() // seqlen
    for cap in (max_windows, protocol_cap):
        if cap is not None:
            n = min(n, cap)
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


def recipe_calibration_windows(recipe, tokenizer, data_dir: str | Path | None = None) -> torch.Tensor:
    """A recipe's calibration windows: its ``calibration`` text (dataset, split) tokenized, then
    ``num_samples`` windows of ``seqlen`` tokens drawn with the recipe's seed."""
    c = recipe.calibration
    return calibration_windows(tokenize(tokenizer, load_text(c.dataset, c.split, data_dir)), c.seqlen,
                               c.num_samples, recipe.seed)
