"""The README names only files and make targets that exist."""

import re

from tests.helpers import REPO

README = (REPO / "README.md").read_text()
PATH = re.compile(r"(?<![\w/.-])((?:llmft|recipes|accelerate_configs|data_prep|benchmarks|tests)/[\w./-]*\w)")


def test_every_path_in_the_readme_exists():
    paths = set(PATH.findall(README))
    assert paths, "the README names no project paths"
    placeholders = {"accelerate_configs/X.yaml"}
    missing = sorted(p for p in paths - placeholders if not (REPO / p).exists())
    assert not missing, f"README names missing paths: {missing}"


def test_every_make_target_in_the_readme_exists():
    targets = set(re.findall(r"make ([a-z][\w-]*)", README))
    makefile = (REPO / "Makefile").read_text()
    missing = sorted(t for t in targets if not re.search(rf"^{re.escape(t)}:", makefile, re.M))
    assert not missing, f"README names missing make targets: {missing}"


def test_ci_runs_make_test():
    assert "make test" in (REPO / ".ci" / "run").read_text()
