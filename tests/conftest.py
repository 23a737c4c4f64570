"""Shared fixtures: one tiny toy model per test session, built offline."""

from __future__ import annotations

from pathlib import Path

import pytest

from zimage_edge.device import DeviceFacts, DeviceKind

CPU_FACTS = DeviceFacts(
    kind=DeviceKind.CPU,
    name="test-cpu",
    total_memory=8 * 1024**3,
    free_memory=6 * 1024**3,
    unified_memory=True,
    system_memory=8 * 1024**3,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zimage_edge.model.toy import save_toy_model

    return save_toy_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path):
    from zimage_edge.model.loading import load_pipeline

    return load_pipeline(tiny_model_dir, facts=CPU_FACTS)
