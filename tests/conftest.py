"""Fixtures: the demo model, and the live stack (Redis, a solo-pool Celery GPU worker, daphne).

The stacks are real processes (tests.stack), isolated from a running `make run` and from each other
by their own Redis key prefix, SQLite file and port.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from tests.stack import ROOT, Stack, launch_stack


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the folders that earlier runs' stacks left under var/test (`<tag>-<pid>`, logs,
    databases and index copies) when their run is over, so repeated runs do not fill the disk."""
    for path in (ROOT / "var" / "test").glob("*-*"):
        pid = path.name.rpartition("-")[2]
        if path.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _fresh_config_cache() -> Iterator[None]:
    """Each test reads the configuration from its own database state, not an earlier test's cache."""
    from chatbot.selectors import config_cache_clear

    config_cache_clear()
    yield
    config_cache_clear()


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The demo model directory, trained first when it is missing or out of date."""
    from django.conf import settings
    from django.core.management import call_command

    call_command("train_demo_model", no_progress_bar=True)
    return Path(settings.LEAFRESH_DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def loaded_demo(demo_model_dir: Path):
    """The demo model loaded in this process (CPU)."""
    from inference.loading import ModelSettings, load_model

    return load_model(ModelSettings(source=str(demo_model_dir), cache_dir=demo_model_dir.parent / "hf", device="cpu"))


@pytest.fixture(scope="session")
def stack(demo_model_dir: Path) -> Iterator[Stack]:
    """The whole stack on the demo model, on a free port, the way `make run` starts it."""
    with launch_stack("stack") as running:
        yield running


@pytest.fixture(scope="session")
def slow_model_dir(demo_model_dir: Path) -> Path:
    """A random-weight Mistral with the demo tokenizer, big enough that one answer takes seconds on a CPU.

    With random weights the constrained strings rarely close, so a request decodes until its token
    budget: a long, steady stream for fault tests.
    """
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    out = ROOT / "var" / "test" / "models" / "slow-random-mistral"
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        sliding_window=None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    staging = out.with_name(out.name + f".tmp-{os.getpid()}")
    MistralForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out


@pytest.fixture(scope="module")
def slow_stack(slow_model_dir: Path) -> Iterator[Stack]:
    """A stack whose worker serves the slow random model (answers run to their token budget)."""
    env = {
        "LEAFRESH_MODEL": str(slow_model_dir),
        "LEAFRESH_HEARTBEAT_TTL_S": "2",
        "LEAFRESH_MAX_RUNNING": "2",  # small bounds, so a test can fill them
        "LEAFRESH_MAX_WAITING": "1",
    }
    with launch_stack("slow", env) as running:
        yield running
