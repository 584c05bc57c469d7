"""The README and docs name only files, make targets and commands that exist, and their commands parse."""

import re
import shlex

import pytest

from llmft.cli import COMMANDS
from tests.helpers import REPO

README = (REPO / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}
TEXTS = {"README.md": README, **DOCS}
PATH = re.compile(r"(?<![\w/.-])((?:llmft|recipes|accelerate_configs|data_prep|benchmarks|tests|docs)/[\w./-]*\w)")
PLACEHOLDERS = {"accelerate_configs/X.yaml"}


def test_every_path_in_the_readme_and_docs_exists():
    for name, text in TEXTS.items():
        paths = set(PATH.findall(text)) - PLACEHOLDERS
        missing = sorted(p for p in paths if not (REPO / p).exists())
        assert not missing, f"{name} names missing paths: {missing}"


def test_every_doc_link_resolves():
    for name, text in TEXTS.items():
        base = REPO if name == "README.md" else REPO / "docs"
        links = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
        missing = [link for link in links if not (base / link).exists()]
        assert not missing, f"{name} links to missing files: {missing}"


def test_every_make_target_in_the_readme_and_docs_exists():
    makefile = (REPO / "Makefile").read_text()
    for name, text in TEXTS.items():
        targets = set(re.findall(r"make ([a-z][\w-]*)", text))
        missing = sorted(t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M))
        assert not missing, f"{name} names missing make targets: {missing}"


def command_lines(text: str) -> list[str]:
    """Every `llmft ...` command in the text's bash blocks (continuation lines joined, comments removed, [optional]
    parts kept without their brackets); `accelerate launch ... -m llmft ...` and `torchrun ... -m llmft ...` count
    from `llmft` on."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line)
            line = re.sub(r"\[([^\]]*)\]", r"\1", line).strip()
            if line.startswith("llmft "):
                commands.append(line)
            elif " -m llmft " in line:
                commands.append("llmft " + line.split(" -m llmft ", 1)[1])
    return commands


ALL_COMMANDS = [(name, line) for name, text in TEXTS.items() for line in command_lines(text)]


def test_the_readme_and_docs_show_commands():
    assert len(ALL_COMMANDS) >= 25 and {line.split()[1] for _, line in ALL_COMMANDS} >= set(COMMANDS)


@pytest.mark.parametrize("name, line", ALL_COMMANDS, ids=[f"{n}:{line[:60]}" for n, line in ALL_COMMANDS])
def test_every_command_in_the_readme_and_docs_parses(name, line, monkeypatch, tmp_path):
    # Commands name paths relative to the project root; run directories they name must not exist (an old run
    # left in runs/ would be read for its settings), so parse from a folder holding only the project's own files.
    for folder in ("recipes", "accelerate_configs", "data_prep", "benchmarks"):
        (tmp_path / folder).symlink_to(REPO / folder)
    monkeypatch.chdir(tmp_path)
    argv = shlex.split(line)[1:]
    assert argv[0] in COMMANDS, f"{name}: unknown command in `{line}`"
    run = COMMANDS[argv[0]](argv[1:])  # parses every option with the real parser; does not run the command
    assert callable(run)


def test_the_layout_lists_every_module():
    block = README.split("## Layout", 1)[1]
    listed = set(re.findall(r"^(llmft/[\w/]+\.py)", block, re.M))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "llmft").rglob("*.py")}
    assert listed <= modules, f"listed but missing: {sorted(listed - modules)}"
    unlisted = {m for m in modules - listed if not m.endswith(("__init__.py", "__main__.py"))}
    assert not unlisted, f"modules missing from the README's layout: {sorted(unlisted)}"


def test_the_readme_is_a_quickstart():
    assert len(README.splitlines()) <= 235


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()
