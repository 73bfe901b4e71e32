import json
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


def test_heap_policy_applies_at_import_and_can_be_declined():
    code = "import vlmkit, json; print(json.dumps(vlmkit.apply_default_allocator()))"
    env = {"PATH": "/usr/bin:/bin"}
    tuned = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                      env=env).stdout)
    assert tuned == {"tuned": True, "mmap_threshold": 32 << 20, "trim_threshold": 1 << 30, "reason": ""}
    system = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       env=dict(env, VLMKIT_MALLOC="system")).stdout)
    assert system["tuned"] is False and system["reason"] == "VLMKIT_MALLOC=system"


def test_every_public_name_exists():
    for name in vlmkit.__all__:
        assert hasattr(vlmkit, name), name
