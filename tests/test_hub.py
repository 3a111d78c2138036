"""lorafit.hub: an unreachable hub switches the process to offline mode after one short probe."""

from __future__ import annotations

import os
import socket
import time

import huggingface_hub.constants
import pytest

from lorafit.config import ModelConfig
from lorafit.errors import ModelError
from lorafit.hub import PROXY_VARIABLES, hub_reachable
from lorafit.models import load_tokenizer, resolve_model_source


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _refuse(*args, **kwargs):
    raise OSError(101, "Network is unreachable")


def test_unreachable_hub_goes_offline_and_a_hub_model_fails_at_once(
    monkeypatch: pytest.MonkeyPatch, fresh_hub_probe: None, no_proxy: None
) -> None:
    calls = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: calls.append(a) or _refuse())
    cfg = ModelConfig(name_or_path="someone/no-such-model")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="the hub cannot be reached and it is not in the local"):
        load_tokenizer(cfg, resolve_model_source(cfg))
    assert time.perf_counter() - start < 10  # huggingface_hub's own retries take ~25 s
    assert huggingface_hub.constants.HF_HUB_OFFLINE and os.environ["HF_HUB_OFFLINE"] == "1"
    assert not hub_reachable() and len(calls) == 1  # probed once per process


def test_reachable_hub_and_proxies_leave_the_hub_online(
    monkeypatch: pytest.MonkeyPatch, fresh_hub_probe: None, no_proxy: None
) -> None:
    class Connection:
        def close(self) -> None:
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    assert hub_reachable() and not huggingface_hub.constants.HF_HUB_OFFLINE
    hub_reachable.cache_clear()
    # behind a proxy a direct connect proves nothing: no probe, the hub stays online
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert hub_reachable() and not huggingface_hub.constants.HF_HUB_OFFLINE


def test_offline_set_by_the_user_is_not_probed(
    monkeypatch: pytest.MonkeyPatch, fresh_hub_probe: None
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed"))
    assert not hub_reachable()
