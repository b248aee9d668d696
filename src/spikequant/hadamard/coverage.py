"""Which Hadamard construction covers the dimensions of popular models, or what expansion they need."""

from __future__ import annotations

from dataclasses import dataclass

from spikequant.hadamard.constructions import NoHadamardError, next_constructible, plan

# model -> (hidden_size, intermediate_size, head_dim), from the models' published configs.
MODEL_DIMS: dict[str, tuple[int, int, int]] = {
    "Llama-2-7B": (4096, 11008, 128),
    "Llama-2-13B": (5120, 13824, 128),
    "Llama-2-70B": (8192, 28672, 128),
    "Llama-3-8B": (4096, 14336, 128),
    "Llama-3-70B": (8192, 28672, 128),
    "Llama-3.2-1B": (2048, 8192, 64),
    "Llama-3.2-3B": (3072, 8192, 128),
    "Mistral-7B": (4096, 14336, 128),
    "Mixtral-8x7B (expert)": (4096, 14336, 128),
    "Qwen2.5-0.5B": (896, 4864, 64),
    "Qwen2.5-1.5B": (1536, 8960, 128),
    "Qwen2.5-3B": (2048, 11008, 128),
    "Qwen2.5-7B": (3584, 18944, 128),
    "Qwen2.5-14B": (5120, 13824, 128),
    "Qwen2.5-32B": (5120, 27648, 128),
    "Qwen2.5-72B": (8192, 29568, 128),
    "Qwen3-8B": (4096, 12288, 128),
    "SmolLM2-135M": (576, 1536, 64),
    "SmolLM2-360M": (960, 2560, 64),
    "SmolLM2-1.7B": (2048, 8192, 64),
    "Phi-3-mini": (3072, 8192, 96),
    "Gemma-2-2B": (2304, 9216, 256),
    "Gemma-2-9B": (3584, 14336, 256),
    "ChatGLM3-6B": (4096, 13696, 128),
}


@dataclass(frozen=True)
class Coverage:
    n: int
    construction: str | None  # e.g. "36 x 2^4, paley2(q=17)"; None if no construction
    online_macs: int | None
    expand_to: int | None  # smallest constructible size above n when no construction exists

    @property
    def text(self) -> str:
        if self.construction is not None:
            return f"{self.construction} ({self.online_macs:,} MAC/vec)"
        return f"**none** -> expand to {self.expand_to} (+{self.expand_to - self.n})"


def coverage(n: int) -> Coverage:
    try:
        p = plan(n)
    except NoHadamardError as e:
        return Coverage(n, None, None, e.above[0])
    k = p.pow2.bit_length() - 1
    name = f"2^{k}" if p.m == 1 else f"{p.m} x 2^{k}, {p.construction}"
    return Coverage(n, name, p.online_macs, None)


def coverage_table(models: dict[str, tuple[int, int, int]] = MODEL_DIMS) -> str:
    """A markdown table: per model, the construction (and online cost) of each dimension."""
    rows = ["| model | hidden | construction | intermediate | construction | head_dim | construction |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, dims in models.items():
        cells = []
        for d in dims:
            cells += [str(d), coverage(d).text]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


__all__ = ["MODEL_DIMS", "Coverage", "coverage", "coverage_table", "next_constructible"]
