"""What a quantizer does, as validated data (the *what*; ``fake.py`` and ``apply.py`` are the *how*)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from spikequant.errors import RecipeError, check_keys

FORMATS = ("int", "fp8_e4m3", "fp8_e5m2")
GRANULARITIES = ("tensor", "channel", "token", "group")
OBSERVERS = ("absmax", "percentile")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer.

    - ``format``: ``int`` (``bits`` 2-8), ``fp8_e4m3`` (with a scale, as serving engines use) or
      ``fp8_e5m2`` (a plain cast with no scale, as the spike-aware paper's code does).
    - ``granularity``: ``tensor``; ``channel`` (weights: per output row; activations: per input
      feature, static only); ``token`` (activations: one scale per token); ``group`` (``group_size``
      consecutive input features per row/token).
    - ``dynamic``: scales from the live tensor; otherwise from calibration through ``observer``
      (``absmax`` or ``percentile`` of |x|). Weights are always quantized from their own values.
    - ``clip_ratio``: multiplies the range before the scale is computed (1.0 = no clipping).
    - ``keep_first_tokens``: activations only; the first k sequence positions pass through unquantized
      and do not enter the scale. Models keeping attention-sink tokens in high precision (their KV
      precomputed as a prefix cache, as PrefixQuant does): on LLaMA-like models those tokens carry the
      spikes, so the per-tensor scale can fit everyone else. The rule sees only the linear's input, not
      token positions: it is meant for full-sequence forward passes (evaluation, prefill); in cached
      decoding a step of at most k new tokens would pass through unquantized.
    - ``outlier_tokens``: activations with granularity ``tensor`` only; in every sequence the k tokens
      with the largest max |x| are left out of the shared scale (and of static calibration) and get a
      scale of their own, in the same format and bits. The spike tokens (attention sink, delimiters)
      stop dictating the resolution of all the others, and nothing stays in float.
    """

    format: str = "int"
    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    group_size: int | None = None
    dynamic: bool = True
    observer: str = "absmax"
    percentile: float = 99.99
    clip_ratio: float = 1.0
    keep_first_tokens: int = 0
    outlier_tokens: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> RecipeError:
            return RecipeError(f"quantizer: {msg}")

        if self.format not in FORMATS:
            raise bad(f"format {self.format!r} not one of {', '.join(FORMATS)}")
        if self.format == "int" and not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise bad(f"bits must be an integer 2-8 for int, got {self.bits!r}")
        if self.format != "int" and not self.symmetric:
            raise bad(f"{self.format} is symmetric only")
        if self.granularity not in GRANULARITIES:
            raise bad(f"granularity {self.granularity!r} not one of {', '.join(GRANULARITIES)}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise bad(f"granularity group needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise bad("group_size is only valid with granularity: group")
        if self.observer not in OBSERVERS:
            raise bad(f"observer {self.observer!r} not one of {', '.join(OBSERVERS)}")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise bad(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.observer == "percentile" and self.granularity != "tensor":
            raise bad("the percentile observer supports granularity tensor only")
        if not isinstance(self.keep_first_tokens, int) or self.keep_first_tokens < 0:
            raise bad(f"keep_first_tokens must be a non-negative integer, got {self.keep_first_tokens!r}")
        if not isinstance(self.outlier_tokens, int) or self.outlier_tokens < 0:
            raise bad(f"outlier_tokens must be a non-negative integer, got {self.outlier_tokens!r}")
        if self.outlier_tokens and (self.granularity != "tensor" or self.is_float_cast):
            raise bad("outlier_tokens needs granularity tensor and a scaled format")
        if not 0.0 < float(self.clip_ratio) <= 1.0:
            raise bad(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")

    @property
    def is_float_cast(self) -> bool:
        return self.format == "fp8_e5m2"

    @property
    def label(self) -> str:
        kind = f"int{self.bits}" if self.format == "int" else self.format
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        mode = "dyn" if self.dynamic else "static"
        keep = f"-keep{self.keep_first_tokens}" if self.keep_first_tokens else ""
        keep += f"-outliers{self.outlier_tokens}" if self.outlier_tokens else ""
        return f"{kind}-{gran}-{mode}" + ("" if self.symmetric else "-asym") + keep

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "quantizer") -> QuantSpec | None:
        """Build from a mapping; ``None`` means "not quantized". Unknown keys fail naming the key."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping or null, got {type(data).__name__}")
        check_keys(data, {f.name for f in fields(cls)}, where)
        try:
            return cls(**data)
        except RecipeError as e:
            raise RecipeError(f"{where}: {str(e).removeprefix('quantizer: ')}") from None
