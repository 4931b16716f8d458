"""Shared fixtures: seeded RNGs for every test, and the packaged SmolLM2 converted once per session.

Tests never touch the network: the Hugging Face offline switches are set here, before
transformers or datasets is imported by any test module.
"""

import importlib.util
import os
import random
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

SRC = Path(__file__).resolve().parents[1] / "src"
if importlib.util.find_spec("saeflow") is None:  # not pip-installed: test the checkout
    sys.path.insert(0, str(SRC))

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from saeflow.models import convert_packaged

SEED = 0


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    """Seed every RNG a test might use, so failures reproduce."""
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny shapes: OpenMP hand-offs cost more than they save,
    and stall on a loaded machine. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def packaged_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged SmolLM2 as a float32 Hugging Face folder (converted once, ~30 s).

    Set ``SAEFLOW_TEST_MODEL_DIR`` to a folder made by ``python -m saeflow.models convert`` to
    reuse it across sessions while iterating; it is converted there if missing.
    """
    cached = os.environ.get("SAEFLOW_TEST_MODEL_DIR")
    if cached:
        if not (Path(cached) / "config.json").is_file():
            convert_packaged(cached)
        return Path(cached)
    return convert_packaged(tmp_path_factory.mktemp("packaged") / "smollm2-135m")


CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-domain-reliability", "--metrics-recording-only"]


def _chromium() -> str | None:
    for path in ("/usr/lib/chromium/chromium-headless-shell", "/usr/bin/chromium-headless-shell",
                 "/usr/bin/chromium"):
        if os.path.exists(path):
            return path
    return None


@pytest.fixture(scope="module")
def page():
    """A page of headless Debian Chromium driven by Playwright, for the viewer's page tests (no
    browser download: the system binary that .ci/run installs)."""
    path = _chromium()
    if path is None:
        pytest.skip("Debian chromium / chromium-headless-shell not installed (see .ci/run)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1200, "height": 1400})
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def tiny_lm() -> LlamaForCausalLM:
    """A random 3-layer Llama (vocab 64, d 16), seeded: for splicing and capture tests."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(cfg).eval()
