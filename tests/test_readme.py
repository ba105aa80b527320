"""README's set-up section stays true: exactly two commands, the first runs training, the second is
exactly what CI runs."""
import re

from conftest import REPO_ROOT


def setup_commands():
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_exactly_two_setup_commands():
    cmds = setup_commands()
    assert len(cmds) == 2
    assert all("\n" not in c for c in cmds), "each set-up command is one line a newcomer copies"


def test_first_command_installs_and_trains():
    install_and_train = setup_commands()[0]
    assert "pip install" in install_and_train
    assert install_and_train.rstrip().endswith("fastchat-ft train")


def test_ci_runs_the_readme_test_command():
    test_cmd = setup_commands()[1]
    ci_lines = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines
    assert "pytest" in test_cmd
