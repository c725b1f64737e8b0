"""Model loading (the real code path, on locally built models) and the demo model's build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from chatbot.demo_corpus import demo_examples
from inference.demo_model import DEMO_MODEL_NAME, DemoTrainingConfig, fingerprint, is_up_to_date, train_demo_model
from inference.loading import ModelLoadError, ModelSettings, load_model, quantization_config

pytestmark = pytest.mark.no_database  # touches no database: run once, not again on PostgreSQL


def test_demo_model_loads_by_path_named_as_a_demo(loaded_demo) -> None:
    assert loaded_demo.name == DEMO_MODEL_NAME and "demo" in loaded_demo.name
    assert loaded_demo.model.config.model_type == "mistral"
    assert loaded_demo.model.generation_config.use_cache is True
    assert not loaded_demo.model.training


def test_demo_model_marker_records_its_inputs(demo_model_dir: Path) -> None:
    marker = json.loads((demo_model_dir / "leafresh_demo.json").read_text())
    config = DemoTrainingConfig()
    assert marker["fingerprint"] == fingerprint(demo_examples(seed_value=config.seed), config)
    assert is_up_to_date(demo_model_dir, marker["fingerprint"])
    assert not is_up_to_date(demo_model_dir, "something else")


def test_demo_model_training_is_deterministic(tmp_path: Path) -> None:
    config = DemoTrainingConfig(steps=3, vocab_size=400, hidden_size=32, intermediate_size=64)
    examples = demo_examples(per_combination=1)[:20]
    first = train_demo_model(tmp_path / "a", examples, config=config, progress=False)
    second = train_demo_model(tmp_path / "b", examples, config=config, progress=False)
    a = load_model(ModelSettings(source=str(first), cache_dir=tmp_path / "hf", device="cpu")).model.state_dict()
    b = load_model(ModelSettings(source=str(second), cache_dir=tmp_path / "hf", device="cpu")).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (first / "tokenizer.json").read_text() == (second / "tokenizer.json").read_text()


def test_four_bit_is_nf4_with_double_quantisation() -> None:
    config = quantization_config("4bit", torch.bfloat16)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("8bit", torch.float16).load_in_8bit
    assert quantization_config("none", torch.float32) is None


def test_unknown_quantization_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="LEAFRESH_QUANTIZATION"):
        quantization_config("3bit", torch.float32)


def test_quantization_without_cuda_is_refused_clearly(demo_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDA"):
        load_model(ModelSettings(source=str(demo_model_dir), cache_dir=tmp_path, quantization="4bit", device="cpu"))


def test_a_missing_model_is_a_load_error_that_never_shows_the_token(tmp_path: Path) -> None:
    secret = "hf_canary_secret_value_123"
    settings = ModelSettings(source=str(tmp_path / "no-such-model"), cache_dir=tmp_path, hf_token=secret, device="cpu")
    assert secret not in repr(settings)
    with pytest.raises(ModelLoadError) as excinfo:
        load_model(settings)
    assert secret not in str(excinfo.value)
