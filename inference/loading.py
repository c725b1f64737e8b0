"""Loading the model and tokenizer once, at GPU-worker start.

`LEAFRESH_MODEL` is a hub id (e.g. `mistralai/Mistral-7B-Instruct-v0.3`, the production target)
or a local directory; weights are cached under the data dir. Quantisation is a setting handed to
`from_pretrained` (bitsandbytes), not a code path of its own. The KV cache stays on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Quantization = Literal["none", "4bit", "8bit"]
QUANTIZATIONS: tuple[str, ...] = ("none", "4bit", "8bit")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message is safe to log (it never contains the token)."""


@dataclass(frozen=True)
class ModelSettings:
    """Where the model comes from and how it is loaded.

    source: hub id or local directory. quantization: none | 4bit (nf4, double quant) | 8bit.
    dtype: weights' dtype, and the 4-bit compute dtype; "auto" = bfloat16 on CUDA, float32 on CPU.
    device: "auto" (CUDA when available, else CPU), "cpu" or "cuda[:n]".
    hf_token: for gated hub models; excluded from repr so it cannot reach a log line.
    """

    source: str
    cache_dir: Path
    quantization: str = "none"
    dtype: str = "auto"
    device: str = "auto"
    hf_token: str | None = field(default=None, repr=False)


@dataclass
class LoadedModel:
    """A model ready to serve: the module in eval mode, its tokenizer, a display name and device."""

    model: Any
    tokenizer: Any
    name: str
    device: Any


def resolve_device(device: str) -> Any:
    """torch.device for a setting: "auto" picks CUDA when available, else CPU."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """torch dtype for a setting; "auto" is bfloat16 on CUDA and float32 elsewhere.

    Raises ModelLoadError for a name outside DTYPES.
    """
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"LEAFRESH_DTYPE must be one of {DTYPES}, not {dtype!r}")
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def quantization_config(quantization: str, compute_dtype: Any) -> Any | None:
    """The bitsandbytes config for a setting: None, nf4 4-bit with double quantisation, or 8-bit.

    4-bit follows QLoRA's recipe (Dettmers et al. 2023, arXiv:2305.14314): NF4 with double quant.
    Raises ModelLoadError for a value outside QUANTIZATIONS.
    """
    from transformers import BitsAndBytesConfig

    if quantization == "none":
        return None
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelLoadError(f"LEAFRESH_QUANTIZATION must be one of {QUANTIZATIONS}, not {quantization!r}")


def display_name(source: str) -> str:
    """The name shown for a model: the demo model's own name when its marker file is present."""
    marker = Path(source) / "leafresh_demo.json"
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text())["name"])
        except (ValueError, KeyError):
            pass
    return source


def load_model(settings: ModelSettings) -> LoadedModel:
    """Load tokenizer and model once; eval mode, KV cache on.

    Raises ModelLoadError with a message that names the source but never the token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    quant = quantization_config(settings.quantization, dtype)
    if quant is not None and device.type != "cuda":
        raise ModelLoadError("bitsandbytes quantisation needs a CUDA device; set LEAFRESH_QUANTIZATION=none on CPU")
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {"cache_dir": str(settings.cache_dir), "token": settings.hf_token}
    failure: str | None = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(settings.source, **common)
        model = AutoModelForCausalLM.from_pretrained(
            settings.source,
            dtype=dtype,
            quantization_config=quant,
            device_map={"": device.index or 0} if quant is not None else None,
            low_cpu_mem_usage=True,
            **common,
        )
    except Exception as exc:  # noqa: BLE001 - re-raised below with a message free of secrets
        failure = f"could not load model {settings.source!r}: {type(exc).__name__}: {exc}"
        if settings.hf_token:
            failure = failure.replace(settings.hf_token, "***")
    if failure is not None:
        # Raised outside the except block: the original exception (which may quote the token) is
        # not kept as __context__ for an error reporter to find.
        raise ModelLoadError(failure)
    if quant is None:
        model.to(device)
    model.eval()
    model.generation_config.use_cache = True
    name = display_name(settings.source)
    logger.info("loaded model %s on %s (%s, quantization=%s)", name, device, dtype, settings.quantization)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=device)
