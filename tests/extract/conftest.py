"""Fixtures for the extraction tests: a tiny random tokenizer, raw-data writers, a local Ray."""

from __future__ import annotations

import pytest


def _save_tiny_tokenizer(path: str, seed: int) -> str:
    """A randomly initialised 4x-down, 16-bit tokenizer saved the way real ones are."""
    import torch

    from bdt.tokenizer import BinaryAutoencoder, TokenizerConfig, save_tokenizer

    torch.manual_seed(seed)
    model = BinaryAutoencoder(TokenizerConfig(ch=32, ch_mult=[1, 1, 1], num_res_blocks=1, z_channels=16))
    save_tokenizer(model, path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    return _save_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer")), seed=0)


@pytest.fixture(scope="session")
def other_tokenizer(tmp_path_factory) -> str:
    """The same tokenizer with other random weights: another fingerprint."""
    return _save_tiny_tokenizer(str(tmp_path_factory.mktemp("tokenizer2")), seed=1)


@pytest.fixture(scope="module")
def ray_local(request, s3_endpoint):
    """One local Ray for the modules that use it, shut down after the last of them (each start
    costs seconds of a shared core). Started after the S3 server so that its workers inherit
    AWS_ENDPOINT_URL_S3 and the test credentials from this process's environment. The drivers
    other tests start never join it: without RAY_ADDRESS, ray_session starts a private Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 object_store_memory=200 * 1024**2)
    try:
        yield ray
    finally:
        if not _used_later(request):
            ray.shutdown()


def _used_later(request) -> bool:
    """Whether a test that runs after this module's tests uses ray_local."""
    items = request.session.items
    last = max(i for i, item in enumerate(items) if item.module is request.module)
    return any("ray_local" in item.fixturenames for item in items[last + 1:])
