"""scripts/fuzz.sh (what `make fuzz` and CI run) fails on every way a fuzz run can
go wrong, shown with deliberately broken libFuzzer targets built here with clang.

The old Makefile loop passed each of these: it discarded the fuzzer's exit status
and looked only for crash-/leak-/timeout- files."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
RUNNER = ROOT / "scripts" / "fuzz.sh"

HEADER = "#include <stdint.h>\n#include <stddef.h>\n#include <stdlib.h>\n#include <string.h>\n#include <unistd.h>\n"
TARGETS = {
    # Control: a clean target must pass, or the runner fails everything.
    "good": "int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) { return 0; }",
    # One allocation over the RSS limit: libFuzzer writes an oom- artifact.
    "oom": """int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
        char* p = (char*)malloc((size_t)3 << 30); if (p) { memset(p, 1, 4096); } return p ? p[n % 4096] : 0; }""",
    # Exits non-zero before libFuzzer runs a single input: no artifact at all.
    "early_exit": """int LLVMFuzzerInitialize(int* argc, char*** argv) { _exit(3); }
        int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) { return 0; }""",
    # A crash on some input (the classic finding).
    "crash": """int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
        if (n > 0 && d[0] == 'x') __builtin_trap(); return 0; }""",
}


@pytest.fixture(scope="module")
def fuzz_tree(tmp_path_factory):
    clang = shutil.which("clang")
    assert clang, "clang is needed (scripts/setup.sh installs it)"
    root = tmp_path_factory.mktemp("fuzz")
    bins, corpus = root / "bin", root / "corpus"
    bins.mkdir()
    for name, body in TARGETS.items():
        src = root / f"{name}.c"
        src.write_text(HEADER + body + "\n")
        subprocess.run([clang, "-g", "-fsanitize=fuzzer,address", str(src), "-o", str(bins / name)], check=True)
    # Exits 0 without being a fuzzer at all (a stub or a wrong binary).
    (bins / "not_a_fuzzer").write_text("#!/bin/sh\nexit 0\n")
    (bins / "not_a_fuzzer").chmod(0o755)
    for name in list(TARGETS) + ["not_a_fuzzer", "missing"]:
        (corpus / name).mkdir(parents=True)
        (corpus / name / "seed").write_bytes(b"x" if name == "crash" else b"seed")
    return root


def run(tree, *targets, seconds=1):
    cmd = ["bash", str(RUNNER), "--bin-dir", str(tree / "bin"), "--corpus", str(tree / "corpus"),
           "--work", str(tree / "work"), "--seconds", str(seconds), "--rss-mb", "1024", *targets]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def test_a_clean_target_passes(fuzz_tree):
    out = run(fuzz_tree, "good")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all 1 targets ran clean" in out.stdout


@pytest.mark.parametrize("target,reason", [
    ("oom", "oom-"),                      # the old loop ignored oom- artifacts
    ("early_exit", "exit status 3"),      # no artifact, only the exit status tells
    ("crash", "crash-"),
    ("not_a_fuzzer", "did not run it"),   # exit 0, no artifact, but libFuzzer never ran
    ("missing", "no executable"),         # a target that was not built
])
def test_each_failure_fails_the_run(fuzz_tree, target, reason):
    out = run(fuzz_tree, target)
    assert out.returncode == 1, out.stdout
    assert f"{target}: FAILED" in out.stdout and reason in out.stdout, out.stdout


def test_one_failure_among_clean_targets_fails_the_run_and_all_run(fuzz_tree):
    out = run(fuzz_tree, "good", "missing", "good")
    assert out.returncode == 1
    assert out.stdout.count("fuzz: good for") == 2
    assert "1 of 3 targets failed: missing" in out.stdout


def test_default_targets_are_the_corpus_folders(fuzz_tree):
    # Without names every corpus folder is a target: a corpus without a binary fails.
    out = run(fuzz_tree)
    assert out.returncode == 1
    assert "5 of 6 targets failed" in out.stdout, out.stdout


def test_the_work_corpus_grows_and_merges_into_the_seed_corpus(tmp_path):
    # A target with real coverage to find: the work corpus keeps what a run found,
    # and --merge folds only the coverage-adding inputs into the committed corpus.
    clang = shutil.which("clang")
    src = tmp_path / "branchy.c"
    src.write_text(HEADER + """int LLVMFuzzerTestOneInput(const uint8_t* d, size_t n) {
        int s = 0; for (size_t i = 0; i < n && i < 8; i++) { if (d[i] == 'a' + (int)i) s++; else break; }
        return s; }\n""")
    (tmp_path / "bin").mkdir()
    subprocess.run([clang, "-fsanitize=fuzzer,address", str(src), "-o", str(tmp_path / "bin" / "branchy")], check=True)
    (tmp_path / "corpus" / "branchy").mkdir(parents=True)
    (tmp_path / "corpus" / "branchy" / "seed").write_bytes(b"z")
    out = run(tmp_path, "branchy", seconds=2)
    assert out.returncode == 0, out.stdout
    found = list((tmp_path / "work" / "branchy").iterdir())
    assert found, "the run kept nothing in its work corpus"
    merge = subprocess.run(["bash", str(RUNNER), "--bin-dir", str(tmp_path / "bin"), "--corpus",
                            str(tmp_path / "corpus"), "--work", str(tmp_path / "work"), "--merge", "branchy"],
                           capture_output=True, text=True, timeout=120)
    assert merge.returncode == 0, merge.stdout
    assert len(list((tmp_path / "corpus" / "branchy").iterdir())) > 1
