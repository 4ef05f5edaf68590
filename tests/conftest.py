"""Shared pytest fixtures.  Environment defaults make DeepSpeed pick its CPU accelerator."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
from tests.s3_server import s3_bucket, s3_server  # noqa: F401 - S3 (moto) fixtures
