"""The README's shell blocks are what a newcomer pastes: each must be valid bash, and every line a comment or
one of the README's commands (prose that lost its leading '# ' inside a block becomes commands; `bash -n` alone
passed such a block, its apostrophes pairing up across lines into one long string)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def test_readme_has_shell_blocks():
    assert len(_bash_blocks()) >= 3


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("index", range(len(_bash_blocks())))
def test_readme_shell_block_is_valid_bash(index):
    block = _bash_blocks()[index]
    result = subprocess.run(["bash", "-n"], input=block, text=True, capture_output=True)
    assert result.returncode == 0, f"README bash block {index}:\n{block}\n{result.stderr}"
    # A line of prose inside a block parses as a command whose name is an English word followed by text;
    # every non-comment line must start like one of the commands the README uses.
    commands = ("pip", "python", "pytest", "ruff", "tritonsplat-track", "data-tools", "bash", "cd", "export", "git",
                "torchrun", "OMP_NUM_THREADS=", "TRITONSPLAT_", "TRITON_", "CUDA_VISIBLE_DEVICES=", "-", "--")
    lines = block.splitlines()
    for at, line in enumerate(lines):
        text = line.strip()
        continued = at > 0 and lines[at - 1].rstrip().endswith("\\")   # the previous line ends with a backslash
        if not text or text.startswith("#") or continued:
            continue
        assert text.startswith(commands), f"README bash block {index}: not a command or comment: {line!r}"
