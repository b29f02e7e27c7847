"""Shared fixtures: a small tokenizer trained in-process on the embedded sample, and the shared data."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tests use tiny tensors: one thread is faster, and immune to OpenMP spin-waits on a busy machine.
    OMP_NUM_THREADS, when set, wins (the suite must also pass with several threads: OMP_NUM_THREADS=2)."""
    import os

    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1").split(",")[0] or 1))
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sample_tokenizer():
    """A 512-token BPE trained on pakar's embedded sample corpus (about a second)."""
    from pakar.corpus import embedded_sample_path, iter_documents
    from pakar.tokenizer import train_tokenizer

    return train_tokenizer(iter_documents([embedded_sample_path()]), vocab_size=512)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """/work/shared/data, found as ../shared/data from the repository; tests skip when it is absent."""
    path = REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"{path} not found")
    return path
