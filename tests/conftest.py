"""Test-wide settings and the fixtures every test folder shares.

Keras must not follow the machine's keras.json (it may name TensorFlow).
"""

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import flip_byte, token_of

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("KERAS_HOME", str(Path(__file__).resolve().parent.parent / ".keras_home"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Hypothesis keeps its example database out of the working tree.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(__import__("tempfile").gettempdir(), "keepbest-hypothesis"))


@pytest.fixture(name="flip_byte")
def flip_byte_fixture():
    """``flip_byte(path, offset=-1, mask=0xFF)``: one corrupted byte, same size."""
    return flip_byte


@pytest.fixture(scope="session")
def dead_token() -> str:
    """The owner token of a writer that has exited (on this host, in this PID namespace)."""
    from keepbest.store import liveness

    child = subprocess.Popen(["true"])
    child.wait()
    token = token_of(child.pid, start=1)
    assert liveness(token) == "dead"
    return token


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 for the whole session, with bucket ``kbest``; the AWS environment
    variables point at it (child processes inherit them)."""
    pytest.importorskip("moto", reason="moto[server] is not installed (pip install 'moto[server]')")
    from tests.s3 import S3Server

    server = S3Server()
    yield server
    server.stop()
