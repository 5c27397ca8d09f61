"""
Every Python and shell example in README.md runs as written, with EchoX-mini (built once into the user cache).

The examples run in a scratch directory laid out as `make demo` leaves the repository (`build/question.wav`, spoken by
flite), each Python block in its own interpreter and each shell block in `bash -e` with the environment's `bin/` on
`PATH` (what `source .venv/bin/activate` gives). Blocks made only of `make` commands are the repository's entry points:
`.ci/run` runs `make demo` and `make test` themselves.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def readme_blocks(language: str) -> list[str]:
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    return [code for lang, code in BLOCK.findall(text) if lang == language]


def _commands(block: str) -> list[str]:
    return [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]


def runnable_shell_blocks() -> list[str]:
    return [block for block in readme_blocks("bash")
            if not all(command.startswith("make ") for command in _commands(block))]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """A directory as `make demo` leaves the repository root: `build/question.wav`."""
    if shutil.which("flite") is None:
        pytest.fail("flite is needed to speak the README's question (make installs it)")
    root = tmp_path_factory.mktemp("readme")
    (root / "build").mkdir()
    subprocess.run(["flite", "-voice", "awb", "-t", "what is the capital of france", "-o", "build/question.wav"],
                   cwd=root, check=True)
    return root


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("ECHOX_MODEL", None)
    return env


def test_the_readme_has_examples_of_each_kind():
    assert len(readme_blocks("python")) >= 3 and runnable_shell_blocks()
    assert any("make demo" in block for block in readme_blocks("bash"))


@pytest.mark.parametrize("index", range(len(readme_blocks("python"))))
def test_python_example_runs(index, demo_dir):
    code = readme_blocks("python")[index]
    result = subprocess.run([sys.executable, "-c", code], cwd=demo_dir, env=_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README Python example {index} failed:\n{code}\n{result.stderr[-3000:]}"
    assert "paris" in result.stdout.lower(), f"README Python example {index} did not answer:\n{result.stdout}"


@pytest.mark.parametrize("index", range(len(runnable_shell_blocks())))
def test_shell_example_runs(index, demo_dir):
    block = runnable_shell_blocks()[index]
    result = subprocess.run(["bash", "-e", "-c", block], cwd=demo_dir, env=_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, f"README shell example {index} failed:\n{block}\n{result.stderr[-3000:]}"
    assert "paris" in result.stdout.lower(), result.stdout
