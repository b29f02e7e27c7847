"""Shared fixtures: a small tokenizer trained in-process on the embedded sample, and the shared data."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
