"""Wheels for running llmft (and benchmarks/gpu_check.sh) on a GPU machine without internet access.

    python benchmarks/gpu_wheels.py --have HAVE.txt [--ship NAME ...] [--python 3.12] [--cuda 130] [--out .whl]

Run where pip reaches a package index, in the environment where llmft is installed (`make setup`): it walks
llmft's requirements through the installed packages' metadata, leaves out what HAVE.txt says the GPU machine
already has, and downloads the rest, at the versions installed here, as wheels for that machine's Python on
manylinux x86_64 (packages published only as source are built here into pure-Python wheels). HAVE.txt lists
distribution names separated by commas, spaces or lines, optionally `name==version` (`pip list
--format=freeze` output works). A package the machine has is shipped only when
HAVE.txt gives a version that does not satisfy what needs it, or --ship names it.
bitsandbytes ships CUDA libraries for every CUDA version (43 MB); only the one for --cuda is kept.
On the GPU machine: pip install --no-index --no-deps --target /tmp/site .whl/*.whl, then PYTHONPATH=/tmp/site:.
(benchmarks/gpu_check.sh does this when .whl/ exists).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

SKIP = {"torch"}  # the GPU machine's own CUDA build: never replaced


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_have(text: str) -> dict[str, str | None]:
    """{normalised name: version or None} from names (or name==version) separated by commas, spaces or lines."""
    have = {}
    for item in re.split(r"[,\s]+", re.sub(r"#.*", "", text)):  # comments run to the line's end
        if item:
            name, _, version = item.partition("==")
            have[norm(name)] = version or have.get(norm(name))  # a version given anywhere is kept
    return have


def requirements(name: str, python: str, extras: set[str] = frozenset()) -> list[Requirement]:
    """What an installed distribution needs on that Python, with the extras asked of it (fsspec[http])."""
    env = {**default_environment(), "python_version": python, "python_full_version": f"{python}.0"}
    try:
        found = [Requirement(text) for text in metadata.distribution(name).requires or []]
    except metadata.PackageNotFoundError:
        raise SystemExit(f"gpu_wheels: {name} is needed on Python {python} but not installed here, so its version "
                         f"is unknown: name it with --also {name}==VERSION.") from None
    return [r for r in found
            if not r.marker or any(r.marker.evaluate({**env, "extra": extra}) for extra in ["", *extras])]


def satisfies(version: str, requirement: Requirement) -> bool:
    """Whether a version meets a requirement (pre-releases count, as on NGC-style builds; an unparsable one does
    not)."""
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def to_ship(root: str, python: str, have: dict[str, str | None], force: set[str]) -> dict[str, str]:
    """{name: why} for each installed package `root` needs that the GPU machine lacks, has at a version that
    does not satisfy a requirement of what is shipped, or that `force` names; walked only through what is
    shipped, since what the machine has brings its own dependencies."""
    ship: dict[str, str] = {}
    extras: dict[str, set[str]] = {}  # the extras asked of each package (fsspec[http]): their requirements too
    while True:  # shipping a package adds its requirements, which can unsettle another: repeat until none
        wanted: dict[str, list[Requirement]] = {}
        for parent in [root, *ship]:
            for requirement in requirements(parent, python, extras.get(parent, set())):
                wanted.setdefault(norm(requirement.name), []).append(requirement)
        now = {}
        for name, needs in sorted(wanted.items()):
            there = have.get(name)
            unmet = [str(r.specifier) for r in needs if there and r.specifier and not satisfies(there, r)]
            if name in SKIP:
                continue
            if name not in have:
                now[name] = "missing there"
            elif name in force:
                now[name] = f"{there or 'a version'} there, shipped as asked"
            elif unmet:
                now[name] = f"{there} there, needs {', '.join(unmet)}"
        asked = {name: {extra for r in needs for extra in r.extras} for name, needs in wanted.items()}
        if now.keys() == ship.keys() and asked == extras:
            return now
        ship, extras = now, asked


def keep_one_cuda(wheel: Path, cuda: str) -> None:
    """Rewrite a bitsandbytes wheel with the CPU library and the one for this CUDA version only (130 or 13.0)."""
    keep = f"cuda{cuda.replace('.', '')}.so"
    with zipfile.ZipFile(wheel) as source:
        if not any(name.endswith(f"libbitsandbytes_{keep}") for name in source.namelist()):
            raise SystemExit(f"gpu_wheels: {wheel.name} has no libbitsandbytes_{keep}: check --cuda "
                             "(torch.version.cuda there).")
    drop = re.compile(rf"libbitsandbytes_(?!{re.escape(keep)}$|cpu\.so$)\w+\.so$")
    with zipfile.ZipFile(wheel) as source, tempfile.NamedTemporaryFile(dir=wheel.parent, delete=False) as out:
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
            for info in source.infolist():
                if drop.search(info.filename):
                    continue
                data = source.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(line for line in lines if not drop.search(line.split(",")[0])).encode()
                target.writestr(info, data)
    Path(out.name).replace(wheel)


def fetch(name: str, version: str, python: str, out: Path) -> tuple[Path, str]:
    """Download the wheel for the GPU machine, else build a pure-Python one from the source release."""
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in range(17, 40)] + ["--platform=manylinux2014_x86_64",
                                                                                "--platform=manylinux1_x86_64"]
    with tempfile.TemporaryDirectory() as tmp:
        wanted = f"{name}=={version}" if version else name
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms, "-d", tmp, wanted]
        how = "wheel"
        if subprocess.run(download, capture_output=True, text=True).returncode != 0:
            how = "built here"
            build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                                    "-w", tmp, wanted], capture_output=True, text=True)
            if build.returncode != 0 or not list(Path(tmp).glob("*-none-any.whl")):
                raise SystemExit(f"gpu_wheels: no wheel for {wanted} for Python {python}, and no "
                                 f"pure-Python one could be built: {build.stderr.strip()[-600:]}")
        wheel = next(Path(tmp).glob("*.whl"))
        return Path(shutil.move(wheel, out / wheel.name)), how  # /tmp may be another filesystem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--have", type=Path, help="what the GPU machine has (names, or name==version)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python (major.minor)")
    parser.add_argument("--cuda", default="130", help="the CUDA version of its torch (torch.version.cuda, with or "
                                                      "without the dot): bitsandbytes keeps that library only")
    parser.add_argument("--ship", nargs="*", default=[], help="packages to ship although the machine has them "
                                                                   "(their version there not known to satisfy llmft)")
    parser.add_argument("--also", nargs="*", default=[], help="more packages for that machine, not llmft "
                                                                   "requirements (e.g. liger-kernel): name or name==version; "
                                                                   "their own dependencies are not brought")
    parser.add_argument("--out", type=Path, default=Path(".whl"))
    parser.add_argument("--max-mb", type=float, default=60.0, help="fail above this total")
    args = parser.parse_args()
    if args.have and not args.have.is_file():
        raise SystemExit(f"gpu_wheels: --have {args.have}: no such file. List what the GPU machine has, one name or "
                         "name==version a line (pip list --format=freeze there), or leave --have out to ship all.")
    have = read_have(args.have.read_text()) if args.have else {}
    ship = to_ship("llmft", args.python, have, {norm(name) for name in args.ship})
    for name in {norm(name) for name in args.ship} - ship.keys():
        print(f"gpu_wheels: --ship {name}: not a requirement of llmft here (or torch): not shipped")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):  # two versions of one package would stop the install there
        old.unlink()
    print("| package | version | why | how | MB |\n|---|---|---|---|---|")
    for name, why in ship.items():
        wheel, how = fetch(name, metadata.version(name), args.python, args.out)
        if name == "bitsandbytes":
            keep_one_cuda(wheel, args.cuda)
            how += f", CUDA {args.cuda} only"
        print(f"| {name} | {metadata.version(name)} | {why} | {how} | {wheel.stat().st_size / 2**20:.1f} |", flush=True)
    for extra in args.also:  # pip picks the newest release for that Python when no version is given
        name, _, version = extra.partition("==")
        wheel, how = fetch(name, version, args.python, args.out)
        print(f"| {name} | {wheel.name.split('-')[1]} | asked for (--also) | {how} | "
              f"{wheel.stat().st_size / 2**20:.1f} |", flush=True)
    total = sum(p.stat().st_size for p in args.out.glob("*.whl")) / 2**20
    print(f"\n{len(ship)} packages, {total:.1f} MB in {args.out}/")
    if total > args.max_mb:
        raise SystemExit(f"gpu_wheels: {total:.1f} MB is over --max-mb {args.max_mb}")


if __name__ == "__main__":
    main()
