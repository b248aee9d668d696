"""Recipes: a YAML/JSON document that fully describes a quantization run, validated on load."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spikequant.algorithms.base import Modifier, modifier_from_dict
from spikequant.errors import RecipeError, check_keys
from spikequant.quant.apply import SLOTS
from spikequant.quant.spec import QuantSpec

PRESET_DIR = Path(__file__).parent / "presets"
DECODER_LINEARS = "decoder_linears"  # target keyword: every q/k/v/o/gate/up/down of every layer


@dataclass(frozen=True)
class Calibration:
    dataset: str = "wikitext2"
    split: str = "validation"
    num_samples: int = 32
    seqlen: int = 512

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Calibration:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise RecipeError(f"{where}: expected a mapping")
        check_keys(data, {"dataset", "split", "num_samples", "seqlen"}, where)
        c = cls(**data)
        for k in ("num_samples", "seqlen"):
            v = getattr(c, k)
            if not isinstance(v, int) or v < 1:
                raise RecipeError(f"{where}: {k} must be a positive integer, got {v!r}")
        return c


@dataclass(frozen=True)
class Override:
    match: tuple[str, ...]
    slots: dict[str, QuantSpec | None]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"match": list(self.match)}
        for k, v in self.slots.items():
            d[k] = None if v is None else v.to_dict()
        return d


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    seed: int = 0
    targets: tuple[str, ...] = (DECODER_LINEARS,)
    weights: QuantSpec | None = None
    inputs: QuantSpec | None = None
    outputs: QuantSpec | None = None
    overrides: tuple[Override, ...] = ()
    calibration: Calibration = field(default_factory=Calibration)
    modifiers: tuple[Modifier, ...] = ()

    @property
    def is_float(self) -> bool:
        return (self.weights is None and self.inputs is None and self.outputs is None
                and not self.overrides and not self.modifiers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "seed": self.seed,
            "targets": list(self.targets),
            **{s: (None if getattr(self, s) is None else getattr(self, s).to_dict()) for s in SLOTS},
            "overrides": [o.to_dict() for o in self.overrides],
            "calibration": vars(self.calibration).copy(),
            "modifiers": [m.to_dict() for m in self.modifiers],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe is a mapping, got {type(data).__name__}")
        check_keys(data, {"name", "description", "seed", *SLOTS, "targets", "overrides", "calibration",
                           "modifiers"}, source)
        if "name" not in data or not isinstance(data["name"], str):
            raise RecipeError(f"{source}: 'name' (a string) is required")
        seed = data.get("seed", 0)
        if not isinstance(seed, int):
            raise RecipeError(f"{source}: seed must be an integer, got {seed!r}")
        targets = data.get("targets", [DECODER_LINEARS])
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise RecipeError(f"{source}: targets must be a list of module-name patterns")
        overrides = []
        for i, o in enumerate(data.get("overrides") or []):
            where = f"{source}: overrides[{i}]"
            if not isinstance(o, dict) or "match" not in o:
                raise RecipeError(f"{where}: needs a 'match' key (a pattern or list of patterns)")
            check_keys(o, {"match", *SLOTS}, where)
            match = [o["match"]] if isinstance(o["match"], str) else o["match"]
            slots = {s: QuantSpec.from_dict(o[s], f"{where}.{s}") for s in SLOTS if s in o}
            overrides.append(Override(tuple(match), slots))
        mods = data.get("modifiers") or []
        if not isinstance(mods, list):
            raise RecipeError(f"{source}: modifiers must be a list")
        return cls(
            name=data["name"],
            description=str(data.get("description", "")),
            seed=seed,
            targets=tuple(targets),
            **{s: QuantSpec.from_dict(data.get(s), f"{source}: {s}") for s in SLOTS},
            overrides=tuple(overrides),
            calibration=Calibration.from_dict(data.get("calibration"), f"{source}: calibration"),
            modifiers=tuple(modifier_from_dict(m, f"{source}: modifiers[{i}]") for i, m in enumerate(mods)),
        )


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _parse_file(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        if line is None:
            line = getattr(e, "lineno", 0) - 1
        at = f" at line {line + 1}" if line >= 0 else ""
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise RecipeError(f"recipe file {path} is not valid {kind}{at}") from None


def load_recipe(name_or_path: str | Path | dict) -> Recipe:
    """A preset name, a path to a ``.yaml``/``.json`` file, or an already-parsed mapping. A recipe may
    ``extends:`` another (a preset name, or a file path relative to the extending file): see
    :func:`resolve_extends`."""
    if isinstance(name_or_path, dict):
        return Recipe.from_dict(resolve_extends(name_or_path, Path.cwd(), "recipe"))
    data, source, base_dir = _read_recipe(name_or_path)
    return Recipe.from_dict(resolve_extends(data, base_dir, source), source=source)


def _read_recipe(name_or_path: str | Path, base_dir: Path | None = None) -> tuple[Any, str, Path]:
    """The parsed mapping of a recipe file or preset, a name for messages, and the folder its own
    ``extends`` paths are relative to."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        if not path.is_file():
            raise RecipeError(f"recipe file not found: {path}")
        return _parse_file(path), str(path), path.parent
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return _parse_file(preset), f"preset {name_or_path}", PRESET_DIR
    raise RecipeError(
        f"unknown recipe preset {str(name_or_path)!r}; presets: {', '.join(list_presets())} "
        "(or give a .yaml/.json file)"
    )


def resolve_extends(data: Any, base_dir: Path, source: str, _seen: tuple[str, ...] = ()) -> Any:
    """A recipe mapping with its ``extends`` chain merged in: ``extends: BASE`` (a preset name or a
    ``.yaml``/``.json`` path, relative to ``base_dir``) starts from BASE's resolved mapping, and every other
    top-level key of this mapping replaces BASE's (``modifiers`` too, the whole list), except
    ``append_modifiers``, which is added after BASE's modifiers. ``name`` is required (a variant names
    itself). The result has no ``extends``: a report records the whole recipe."""
    if not isinstance(data, dict) or "extends" not in data:
        if isinstance(data, dict) and "append_modifiers" in data:
            raise RecipeError(f"{source}: append_modifiers needs extends (the recipe its modifiers are added to)")
        return data
    base_ref = data["extends"]
    if not isinstance(base_ref, str):
        raise RecipeError(f"{source}: extends must be a preset name or a recipe file path, got {base_ref!r}")
    if "name" not in data:
        raise RecipeError(f"{source}: a recipe that extends {base_ref!r} needs its own 'name'")
    base_data, base_source, base_base_dir = _read_recipe(base_ref, base_dir)
    if base_source in _seen or base_source == source:
        chain = " -> ".join((*_seen, source, base_source))
        raise RecipeError(f"{source}: extends {base_ref!r} makes a cycle ({chain})")
    base = resolve_extends(base_data, base_base_dir, base_source, (*_seen, source))
    if not isinstance(base, dict):
        raise RecipeError(f"{base_source}: a recipe is a mapping, got {type(base).__name__}")
    out = {**base, **{k: v for k, v in data.items() if k not in ("extends", "append_modifiers")}}
    extra = data.get("append_modifiers")
    if extra is not None:
        if not isinstance(extra, list):
            raise RecipeError(f"{source}: append_modifiers must be a list")
        out["modifiers"] = [*(out.get("modifiers") or []), *extra]
    return out


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False), encoding="utf-8")
