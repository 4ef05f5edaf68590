"""A real S3 endpoint for tests: moto's server on 127.0.0.1, spoken to over HTTP.

``s3_server`` (session scope) starts it on a free port and points the standard AWS variables
at it for the rest of the session (dummy credentials).  ``MotoS3.stop()``/``start()`` take it
down and bring it back on the same port, with the same buckets (moto keeps them in-process),
to test recovery from an outage.  ``s3_bucket`` gives each test a fresh, empty bucket.
"""

from __future__ import annotations

import itertools
import os
import time

import pytest

_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
_bucket_ids = itertools.count()


class MotoS3:
    def __init__(self) -> None:
        self.port = 0
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        for attempt in range(50):  # the old socket may linger for a moment after stop()
            try:
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                server.start()
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        self._server = server
        self.port = server._server.server_port

    def stop(self) -> None:
        """Shut the server down and close its socket, so clients see refused connections."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()
            server._server.server_close()

    def restart(self, down_for: float = 0.0) -> None:
        self.stop()
        time.sleep(down_for)
        self.start()

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=_ENV["AWS_DEFAULT_REGION"],
                            aws_access_key_id=_ENV["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=_ENV["AWS_SECRET_ACCESS_KEY"])

    def new_bucket(self, prefix: str = "dsclip-test") -> str:
        name = f"{prefix}-{next(_bucket_ids)}-{os.getpid()}"
        self.client().create_bucket(Bucket=name)
        return name

    def upload_dir(self, local: str, bucket: str, prefix: str = "") -> None:
        client = self.client()
        for name in sorted(os.listdir(local)):
            path = os.path.join(local, name)
            if os.path.isfile(path):
                client.upload_file(path, bucket, f"{prefix.rstrip('/')}/{name}" if prefix else name)


@pytest.fixture(scope="session")
def s3_server():
    saved = {k: os.environ.get(k) for k in [*_ENV, "AWS_ENDPOINT_URL"]}
    server = MotoS3()
    server.start()
    os.environ.update(_ENV)
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server) -> str:
    return s3_server.new_bucket()
