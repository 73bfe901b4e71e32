import os
import subprocess
import sys

import torch

import vlmkit


def test_version_and_torch_version():
    assert vlmkit.__version__ == "0.1.0"
    assert vlmkit.torch_version.split(".")[:2] == torch.__version__.split(".")[:2]


def test_openblas_serves_libtorch_and_threads_follow_policy():
    info = vlmkit.thread_info()
    # The Debian set-up guarantees OpenBLAS (make test sets VLMKIT_EXPECT_BLAS).
    if os.environ.get("VLMKIT_EXPECT_BLAS"):
        assert info["blas"] == os.environ["VLMKIT_EXPECT_BLAS"], info
    assert info["torch_threads"] == 1
    vlmkit.set_num_threads(1, 1)
    assert vlmkit.thread_info()["blas_threads"] == 1
    vlmkit.apply_default_threads()


def test_environment_overrides_threads():
    code = "import vlmkit; i = vlmkit.thread_info(); print(i['torch_threads'], i['blas_threads'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"VLMKIT_TORCH_THREADS": "2", "VLMKIT_BLAS_THREADS": "1",
                              "PATH": "/usr/bin:/bin"})
    assert out.stdout.split() == ["2", "1"]


def test_every_public_name_exists():
    for name in vlmkit.__all__:
        assert hasattr(vlmkit, name), name
