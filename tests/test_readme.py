"""The README's commands as written: the quick ones run (in a scratch folder, the venv's bin on
PATH as after ``source .venv/bin/activate``); every file the others name exists; the accelerate
lines say how many processes to start."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICK = ("xdrec doctor", "xdrec plan ", "xdrec train configs/experiment/tiny.yaml")


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks, comments stripped, continuations joined."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ")[0].strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def test_every_file_a_readme_command_names_exists_and_accelerate_lines_give_a_process_count():
    commands = readme_commands()
    assert any(c.startswith("make demo") for c in commands) and any(c.startswith("make test") for c in commands)
    for c in commands:
        for path in re.findall(r"\b((?:configs|slurm)/[\w./-]+\.(?:yaml|sbatch))", c):
            assert (REPO / path).is_file(), (c, path)
        if c.startswith("accelerate launch"):
            assert "--num_processes" in c, c


@pytest.mark.parametrize("prefix", QUICK)
def test_the_quick_readme_commands_run_as_written(prefix, tmp_path):
    matches = [c for c in readme_commands() if c.startswith(prefix)]
    assert matches, f"the README no longer shows `{prefix}...`"
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "WANDB_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    for command in matches:
        p = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, (command, p.stdout[-2000:], p.stderr[-2000:])
        if prefix.startswith("xdrec train"):
            assert (tmp_path / "runs" / "tiny" / "metrics.json").is_file() and "Test metrics" in p.stdout
        if prefix.startswith("xdrec plan"):
            assert "recommended for 80.00 GiB per rank" in p.stdout
