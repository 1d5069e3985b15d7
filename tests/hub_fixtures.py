"""Pytest fixtures for the Hub stand-in; load with ``pytest_plugins = ["tests.hub_fixtures"]``."""

from __future__ import annotations

import pytest

from tests.hub_standin import HubStandin


def online(monkeypatch) -> None:
    """Online mode whatever the environment was when huggingface_hub was first imported (it reads it once)."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub(monkeypatch) -> HubStandin:
    """A fresh, empty Hub stand-in on 127.0.0.1 (ephemeral port); stopped after the test.

    Also sets what the client must see in tests: no Xet (every upload travels inline in the commit), no token
    from the developer's machine, no telemetry.
    """
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # read once at import
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    online(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_standin_token")
    standin = HubStandin().start()
    try:
        yield standin
    finally:
        standin.stop()
