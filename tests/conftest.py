"""Shared pytest fixtures.  Environment defaults make DeepSpeed pick its CPU accelerator."""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - S3 (moto) fixtures


@pytest.fixture
def tokenizer():
    """The tiny test model's tokenizer (shared by the data tests)."""
    from tests.test_data_wds import shared_tokenizer

    return shared_tokenizer()


@pytest.fixture
def preprocess():
    """32 px training transform (shared by the data tests)."""
    from tests.test_data_wds import shared_preprocess

    return shared_preprocess()
