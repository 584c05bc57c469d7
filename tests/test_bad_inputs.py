"""The bad-input corpus: every broken or unusual file in tests/bad_inputs/ gets the answer cases.yaml names.

Each case runs `llmft` in a fresh copy of the files and checks the exit code, that no traceback escaped, the text a
user needs, and for dataset builds that every row read is accounted for: kept or rejected with a reason, and every
kept row that did not reach a split dropped by a counted step (duplicates, contamination, mixing).

Every case runs through the CLI's entry function in this process (one import of the libraries for ~100 cases: 7 s,
where a subprocess per case would take 2-7 s each); the first case of each command also runs as a real `llmft`
subprocess, for what only a process shows (the console script, its exit status, anything printed at exit).
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from llmft.cli import run
from tests.conftest import LLMFT

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


def _materialise(tmp: Path, model: Path) -> None:
    """Copy the corpus into tmp, with {model} in the text files made the tiny model's folder."""
    shutil.copytree(CORPUS / "files", tmp, dirs_exist_ok=True)
    for path in tmp.rglob("*.yaml"):
        path.write_text(path.read_text().replace("{model}", str(model)))


def _llmft(argv: list[str], model: Path, capfd) -> tuple[int, str]:
    code = run([arg.replace("{model}", str(model)) for arg in argv])
    out, err = capfd.readouterr()
    return code, out + err


def _check(case: dict, code: int, text: str, folder: Path) -> None:
    assert "Traceback" not in text, text
    assert code == case["exit"], text
    for expected in case.get("expect", []):
        assert expected in text, f"{expected!r} not in:\n{text}"
    if "rows" in case:
        _check_accounting(folder / case["run"][case["run"].index("--out") + 1], case["rows"])


def _check_accounting(out: Path, expected_rows: int) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    kept = 0
    for source in manifest["sources"]:
        assert source["read"] == source["kept"] + sum(source["rejected"].values()), source
        kept += source["kept"]
    steps = manifest["steps"]
    dropped = steps["dedupe"]["exact"] + steps["dedupe"]["near"] + steps["decontaminate"]["dropped"]
    available = sum(mix["available"] for mix in steps["mix"].values())
    assert kept - dropped == available, (kept, dropped, steps)
    written = sum(split["rows"] for split in manifest["output"].values())
    assert written == sum(mix["used"] for mix in steps["mix"].values())
    assert manifest["output"]["train"]["rows"] == expected_rows
    rejected = sum(sum(source["rejected"].values()) for source in manifest["sources"])
    if rejected:  # every rejected row is in rejects.jsonl, with where it came from and why
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        assert len(rejects) == rejected
        assert all(r.get("reason") and r.get("source") for r in rejects), rejects[:3]


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input(case, tmp_path, tiny_model_dir, capfd, monkeypatch):
    _skip_where_installed(case)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    _materialise(tmp_path, tiny_model_dir)
    if "setup" in case:
        code, text = _llmft(case["setup"], tiny_model_dir, capfd)
        assert code == 0, text
    code, text = _llmft(case["run"], tiny_model_dir, capfd)
    _check(case, code, text, tmp_path)


def _skip_where_installed(case: dict) -> None:
    if "without" in case and importlib.util.find_spec(case["without"]):
        pytest.skip(f"{case['without']} is installed here: the case is about a machine without it")


def _command(case: dict) -> str:
    return " ".join(case["run"][:2]) if case["run"][0] == "data" else case["run"][0]


FIRST_OF_EACH_COMMAND = list({_command(case): case for case in reversed(CASES)}.values())


@pytest.mark.slow
@pytest.mark.parametrize("case", FIRST_OF_EACH_COMMAND, ids=[case["id"] for case in FIRST_OF_EACH_COMMAND])
def test_bad_input_through_the_console_script(case, tmp_path, tiny_model_dir, quiet_env):
    _skip_where_installed(case)
    _materialise(tmp_path, tiny_model_dir)
    for step in ("setup", "run"):
        argv = [arg.replace("{model}", str(tiny_model_dir)) for arg in case.get(step, [])]
        if argv:
            done = subprocess.run([LLMFT, *argv], cwd=tmp_path, env=quiet_env, capture_output=True, text=True,
                                  timeout=300)
            assert step == "run" or done.returncode == 0, done.stderr
    _check(case, done.returncode, done.stdout + done.stderr, tmp_path)


def test_every_corpus_file_is_used():
    """A file nobody reads tests nothing; a case naming a missing file tests the wrong thing."""
    named = {arg.split("/")[0] for case in CASES for arg in case["run"] + case.get("setup", [])}
    for config in (CORPUS / "files").glob("*.yaml"):  # files the recipes, build and self-chat configs name
        named |= set(re.findall(r"[\w.-]+", config.read_text()))
    unused = [p.name for p in (CORPUS / "files").iterdir() if p.name not in named]
    assert not unused, unused
    assert len({case["id"] for case in CASES}) == len(CASES), "case ids repeat"


def test_no_test_file_is_ignored_by_git():
    """A test file .gitignore matches (in a folder named data/) exists in the working copy and nowhere else."""
    if shutil.which("git") is None or not (CORPUS.parents[1] / ".git").exists():
        pytest.skip("not a git checkout: nothing decides what is committed")
    files = [str(p.relative_to(CORPUS.parents[1])) for p in CORPUS.parent.rglob("*") if p.is_file()
             and not any(part == "__pycache__" or part.startswith(".") for part in p.relative_to(CORPUS.parent).parts)]
    done = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=CORPUS.parents[1],
                          capture_output=True, text=True)
    assert not done.stdout.split(), f"rename these, or they are never committed: {done.stdout}"
