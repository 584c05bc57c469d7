"""benchmarks/gpu_wheels.py: which of llmft's requirements a GPU machine without internet access needs shipped as
wheels, read from the installed packages' real metadata, and the bitsandbytes wheel cut to one CUDA library. The
downloads themselves need a package index and are not run here."""

import importlib.util
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "benchmarks" / "gpu_wheels.py")
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)


def test_have_lists_names_and_keeps_a_version_given_anywhere():
    have = gpu_wheels.read_have("accelerate==1.15.0\nTransformers==5.17.0\n# a comment\ntorch, Huggingface_Hub pyyaml,"
                                "accelerate")
    assert have == {"accelerate": "1.15.0", "transformers": "5.17.0", "torch": None, "huggingface-hub": None,
                    "pyyaml": None}


def test_a_bare_machine_gets_everything_llmft_needs_but_torch():
    ship = gpu_wheels.to_ship("llmft", "3.12", {}, set())
    assert {"trl", "transformers", "peft", "datasets", "bitsandbytes", "deepspeed", "lm-eval"} <= ship.keys()
    assert "torch" not in ship and all(why == "missing there" for why in ship.values())
    # Dependencies of dependencies come too (datasets needs dill and multiprocess).
    assert {"dill", "multiprocess"} <= ship.keys()


def test_what_the_machine_has_stays_unless_its_version_falls_short_or_it_is_asked_for():
    bare = gpu_wheels.to_ship("llmft", "3.12", {}, set())
    have = {name: None for name in bare}
    assert gpu_wheels.to_ship("llmft", "3.12", have, set()) == {}
    ship = gpu_wheels.to_ship("llmft", "3.12", {**have, "transformers": "5.17.0", "trl": metadata.version("trl")},
                              {"peft"})
    assert ship.keys() == {"transformers", "peft"}
    assert ship["transformers"].startswith("5.17.0 there, needs ") and "5.23" in ship["transformers"]
    assert ship["peft"] == "a version there, shipped as asked"


def test_a_package_the_machine_has_brings_its_own_dependencies():
    """huggingface-hub there at a version transformers accepts: what only it needs is not shipped."""
    bare = gpu_wheels.to_ship("llmft", "3.12", {}, set())
    others = {gpu_wheels.norm(r.name) for name in ["llmft", *bare] if name != "huggingface-hub"
              for r in gpu_wheels.requirements(name, "3.12")}
    only_hub = {gpu_wheels.norm(r.name) for r in gpu_wheels.requirements("huggingface-hub", "3.12")} - others
    assert only_hub  # e.g. its HTTP client
    ship = gpu_wheels.to_ship("llmft", "3.12", {"huggingface-hub": metadata.version("huggingface-hub")}, set())
    assert "huggingface-hub" not in ship and not only_hub & ship.keys()


def test_bitsandbytes_keeps_the_cpu_library_and_one_cuda_version(tmp_path):
    wheel = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    libraries = ["cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm72"]
    record = "".join(f"bitsandbytes/libbitsandbytes_{lib}.so,sha256=x,3\n" for lib in libraries)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("bitsandbytes/__init__.py", "x = 1\n")
        for lib in libraries:
            z.writestr(f"bitsandbytes/libbitsandbytes_{lib}.so", b"elf")
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record + "bitsandbytes/__init__.py,sha256=y,6\n")
    with pytest.raises(SystemExit, match=r"no libbitsandbytes_cuda124\.so: check --cuda"):
        gpu_wheels.keep_one_cuda(wheel, "12.4")  # a library the wheel lacks: said, nothing dropped
    gpu_wheels.keep_one_cuda(wheel, "13.0")  # as torch.version.cuda prints it
    with zipfile.ZipFile(wheel) as z:
        assert sorted(z.namelist()) == ["bitsandbytes-0.50.2.dist-info/RECORD", "bitsandbytes/__init__.py",
                                        "bitsandbytes/libbitsandbytes_cpu.so", "bitsandbytes/libbitsandbytes_cuda130.so"]
        kept = z.read("bitsandbytes-0.50.2.dist-info/RECORD").decode().splitlines()
        assert [line.split(",")[0] for line in kept] == ["bitsandbytes/libbitsandbytes_cpu.so",
                                                        "bitsandbytes/libbitsandbytes_cuda130.so",
                                                        "bitsandbytes/__init__.py"]
        assert z.read("bitsandbytes/__init__.py") == b"x = 1\n"


def test_extras_asked_of_a_shipped_package_bring_their_requirements():
    """evaluate (shipped: missing there) needs fsspec[http]: fsspec shipped brings aiohttp (missing there too);
    fsspec left to the machine brings nothing of ours."""
    assert "aiohttp" not in {gpu_wheels.norm(r.name) for r in gpu_wheels.requirements("fsspec", "3.12")}
    assert "aiohttp" in gpu_wheels.to_ship("llmft", "3.12", {"fsspec": None}, {"fsspec"})
    assert "aiohttp" not in gpu_wheels.to_ship("llmft", "3.12", {"fsspec": None}, set())


def test_versions_that_do_not_parse_or_are_prereleases():
    from packaging.requirements import Requirement

    assert gpu_wheels.satisfies("2.6.0a0+ecf3bae40a", Requirement("torch>=2.4,<2.14"))
    assert not gpu_wheels.satisfies("not-a-version", Requirement("torch>=2.4"))
