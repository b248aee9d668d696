"""Which Hadamard construction covers the dimensions of popular models, or which expansion they need."""

from __future__ import annotations

from dataclasses import dataclass

from spikequant.hadamard.constructions import (
    FAST_FACTOR,
    HadamardPlan,
    NoHadamardError,
    alternatives,
    plan,
    previous_plan,
)

# model -> (hidden_size, intermediate_size, head_dim), from the models' published config.json files.
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
DIM_NAMES = ("hidden", "intermediate", "head_dim")


@dataclass(frozen=True)
class Coverage:
    """How one dimension is covered: its plan, or (no construction) the expansion target and its plan."""

    n: int
    plan: HadamardPlan | None
    expand_to: int | None = None  # nearest size above n with a dense factor <= FAST_FACTOR
    expand_plan: HadamardPlan | None = None

    @property
    def covered(self) -> bool:
        return self.plan is not None

    @property
    def changed(self) -> bool:
        """Whether the plan differs from the previous rule's (smallest Paley dense factor, no stored orders)."""
        before = previous_plan(self.n)
        p = self.plan
        return (before is None) != (p is None) or (
            before is not None and p is not None and (before.pow2, before.factors) != (p.pow2, p.factors))

    @property
    def cell(self) -> str:
        """Short markdown for a table cell: '11008 = 172·2^6' or '3776: none, expand +64 -> 3840'."""
        if self.plan is not None:
            p = self.plan
            return f"{self.n} = 2^{p.k}" if p.m == 1 else f"{self.n} = {p.m}·2^{p.k}"
        assert self.expand_to is not None
        return f"**{self.n}: none**, expand +{self.expand_to - self.n} -> {self.expand_to}"


def coverage(n: int) -> Coverage:
    """The construction for dimension n, or where Dimension Expansion has to take it."""
    try:
        return Coverage(n, plan(n))
    except NoHadamardError as e:
        return Coverage(n, None, e.target, plan(e.target))


def _short(p: HadamardPlan) -> str:
    return f"2^{p.k}" if p.m == 1 else (f"{p.m}" if p.pow2 == 1 else f"{p.m}·2^{p.k}")


def coverage_table(models: dict[str, tuple[int, int, int]] | None = None, max_alternatives: int = 2) -> str:
    """Markdown: one row per model (its three dimensions), then one row per distinct dimension with the
    chosen construction, its modelled cost and online cost against a dense matmul, the alternatives' costs,
    the previous rule's plan where it differs (or the expansion needed), then the list of changed sizes."""
    models = MODEL_DIMS if models is None else models
    lines = ["| model | hidden | intermediate | head_dim |", "| --- | --- | --- | --- |"]
    users: dict[int, list[str]] = {}
    for name, dims in models.items():
        lines.append(f"| {name} | " + " | ".join(coverage(d).cell for d in dims) + " |")
        for label, d in zip(DIM_NAMES, dims, strict=True):
            users.setdefault(d, [])
            if label not in users[d]:
                users[d].append(label)
    lines += ["", "| n | as | construction | cost/element | online MACs/vector | dense MACs/vector | dense / online "
              "| alternatives (cost/element) | previous plan |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    changed = []
    for n in sorted(users):
        c = coverage(n)
        p = c.plan if c.plan is not None else c.expand_plan
        assert p is not None
        what = p.name if c.plan is not None else (
            f"**none**; expand +{p.n - n} -> {p.n} = {p.name}")
        alts = alternatives(p.n)[:max_alternatives]
        alt = ", ".join(f"{_short(a)} ({a.cost:.0f})" for a in alts) or "-"
        before = previous_plan(n)
        if c.changed:
            changed.append(n)
            prev = f"**{before.name}** ({before.cost:.0f})" if before is not None else "**none**"
        else:
            prev = "same"
        lines.append(f"| {n} | {', '.join(users[n])} | {what} | {p.cost:.0f} | {p.online_macs:,} | "
                     f"{p.dense_macs:,} | {p.dense_macs / p.online_macs:.0f}x | {alt} | {prev} |")
    lines += ["", f"Expansion targets have a dense factor <= {FAST_FACTOR}; costs of an expanded size are "
              "those of the target. Cost/element is the planner's model (multiply-add equivalents, "
              "`plan_cost`); the previous plan is the rule before stored orders and the cost model (smallest "
              "Paley dense factor).", "",
              "Plans changed: " + (", ".join(map(str, changed)) if changed else "none") + "."]
    return "\n".join(lines)
