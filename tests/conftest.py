"""Shared fixtures: tiny random models (built once per session) and the shared data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# `from tests.tiny import ...` works under plain `pytest` too (not only `python -m pytest`).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.tiny import tiny_bert, tiny_llama  # noqa: E402

# Another init seed checks that the learning thresholds of the tests do not hang on one draw:
# LORAFIT_TINY_SEED=1 python -m pytest -q
TINY_SEED = int(os.environ.get("LORAFIT_TINY_SEED", "0"))


@pytest.fixture(scope="session")
def tiny_bert_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of a tiny BERT-like encoder (hidden 64, 2 layers, pooler) + WordPiece tokenizer."""
    return tiny_bert(tmp_path_factory.mktemp("tiny_bert"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Folder of a tiny Llama-like causal LM (hidden 64, 2 layers) + BPE tokenizer with a chat template."""
    return tiny_llama(tmp_path_factory.mktemp("tiny_llama"), seed=TINY_SEED)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder: $LORAFIT_DATA_DIR, else <repo>/../shared/data."""
    path = Path(os.environ.get("LORAFIT_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    if not path.is_dir():
        pytest.fail(
            f"shared data folder {path} is missing; set LORAFIT_DATA_DIR to the data folder"
        )
    return path


@pytest.fixture
def fresh_hub_probe(monkeypatch: pytest.MonkeyPatch):
    """lorafit.hub's once-per-process probe forgotten before and after the test, and the offline
    switches it may set restored afterwards."""
    import datasets.config
    import huggingface_hub.constants

    from lorafit.hub import hub_reachable

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub_reachable.cache_clear()
    yield
    hub_reachable.cache_clear()
