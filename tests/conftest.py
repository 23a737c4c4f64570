"""Shared fixtures: one tiny toy model per test session, built offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from zimage_edge.device import DeviceFacts, DeviceKind

# The suite shares its cores with other processes (other test runs, builds, the agents some tests
# start): one torch thread per test process unless ZIMAGE_CPU__THREADS / ZIMAGE_CPU__SHARE say
# otherwise. benchmarks/results/cpu-threads.md (2 cores, shapes model, s/image p50): two torch
# processes side by side 0.128 s with one thread each against 0.570 s with torch's one per core;
# alone, one thread costs ~0.1 s against 0.07-0.14 s with two.
TEST_THREADS = 1


def pytest_configure(config: pytest.Config) -> None:
    """Set torch's threads before any test imports a model (``set_num_interop_threads`` works once).

    The choice goes into the environment too, so that the commands the tests run in-process (which
    apply ``ZIMAGE_CPU__*`` themselves) and the agents they start as processes follow it.
    """
    from zimage_edge.cpu import CpuSettings, configure_threads

    if not CpuSettings().model_fields_set:
        os.environ["ZIMAGE_CPU__THREADS"] = str(TEST_THREADS)
    configure_threads(CpuSettings())


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


@pytest.fixture(scope="session")
def medium_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zimage_edge.model.toy import save_toy_model

    return save_toy_model(tmp_path_factory.mktemp("models") / "medium", size="medium", seed=0)


class ArtifactFactory:
    """Builds each (model, variant) artifact once per session; tests copy before they damage one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.built: dict[tuple[str, str], Path] = {}

    def get(self, source: Path, variant: str, *, sign_key=None) -> Path:
        from quantize.build import BuildOptions, build_artifact
        from quantize.quality import QualitySpec
        from quantize.signing import key_id
        from quantize.variants import get_variant

        # Signed by which key: the same variant signed by two keys is two artifacts.
        key = (str(source), variant + (f"-signed-{key_id(sign_key.public_key())}" if sign_key else ""))
        if key not in self.built:
            out = self.root / f"{source.name}-{key[1]}"
            options = BuildOptions(
                quality=QualitySpec(prompts=("a red circle on a blue background",), width=64, height=64),
                sign_key=sign_key,
                facts=CPU_FACTS,
            )
            build_artifact(source, get_variant(variant), out, options)
            self.built[key] = out
        return self.built[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> ArtifactFactory:
    return ArtifactFactory(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory):
    from quantize.signing import generate_keypair, load_private_key, load_public_key

    private, public = generate_keypair(tmp_path_factory.mktemp("keys"))
    return load_private_key(private), load_public_key(public), public
