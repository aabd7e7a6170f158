"""Unit tests never touch the host's kvmrun data directory (kvmrun.storage.overlays records
the overlays it makes there): each test gets its own."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVMRUN_DATA_DIR", str(tmp_path_factory.mktemp("data")))
