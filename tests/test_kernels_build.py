"""Building and loading the fused ops: import side effects, the cache key, toolchain errors, the fallback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import toolchain

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_import_compiles_nothing_and_touches_no_gpu(tmp_path: Path) -> None:
    result = _python(
        "import sys, torch, kernels\n"
        "assert 'torch.utils.cpp_extension' not in sys.modules\n"
        "assert not torch.cuda.is_initialized()\n"
        "assert not kernels.ops.is_loaded('cpu')\n"
        "print('ok')",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
    )
    assert result.stdout.strip() == "ok", result.stderr
    assert not any(tmp_path.iterdir())


def test_without_building_auto_falls_back_to_the_reference_with_one_warning(tmp_path: Path) -> None:
    result = _python(
        "import warnings, torch, kernels\n"
        "from kernels.reference import ms_deform_attn_reference\n"
        "shapes = torch.tensor([[2, 3]]); starts = torch.tensor([0])\n"
        "value = torch.randn(1, 6, 1, 4); loc = torch.rand(1, 5, 1, 1, 2, 2); w = torch.rand(1, 5, 1, 1, 2)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        out = kernels.ms_deform_attn(value, shapes, starts, loc, w)\n"
        "assert torch.equal(out, ms_deform_attn_reference(value, shapes, starts, loc, w))\n"
        "assert len(caught) == 1, [str(c.message) for c in caught]\n"
        "print(caught[0].message)\n"
        "try:\n"
        "    kernels.ms_deform_attn(value, shapes, starts, loc, w, implementation='fused')\n"
        "except kernels.KernelBuildError as err:\n"
        "    print('fused:', err)\n",
        TORCH_EXTENSIONS_DIR=str(tmp_path),
        DINO_KERNELS_BUILD="0",
    )
    assert result.returncode == 0, result.stderr
    assert "using the PyTorch reference for cpu tensors" in result.stdout
    assert (
        "DINO_KERNELS_BUILD=0 forbids building on first use: run `python -m kernels.build`" in result.stdout
    )
    assert "fused: the cpu kernels are not built" in result.stdout
    assert not any(tmp_path.iterdir())


def test_build_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    for raw, expected in (("1", True), ("0", False), ("no", False), ("", None)):
        monkeypatch.setenv(toolchain.BUILD_ENV, raw)
        if expected is None:
            with pytest.raises(ValueError, match="expected 1 or 0"):
                toolchain.build_enabled()
        else:
            assert toolchain.build_enabled() is expected
    monkeypatch.delenv(toolchain.BUILD_ENV)
    assert toolchain.build_enabled()


def test_library_name_follows_sources_and_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    spec = toolchain.library_spec("cpu")
    assert spec.directory == tmp_path / "dino_kernels" / spec.name
    assert toolchain.library_spec("cpu") == spec  # stable
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    for path in toolchain.CSRC.iterdir():
        (csrc / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(toolchain, "CSRC", csrc)
    assert toolchain.library_spec("cpu").name == spec.name
    with (csrc / "ms_deform_attn.h").open("a") as header:
        header.write("// changed\n")
    assert toolchain.library_spec("cpu").name != spec.name
    monkeypatch.setattr(toolchain, "cpu_capability_flags", lambda: ("-mavx2",))
    assert toolchain.library_spec("cpu").cflags[-1] == "-mavx2"


def test_cuda_library_name_follows_the_arch_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    ampere = toolchain.library_spec("cuda")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    both = toolchain.library_spec("cuda")
    assert ampere.name != both.name
    assert "-gencode=arch=compute_90,code=sm_90" in both.cuda_cflags


def test_parse_arch_list() -> None:
    assert toolchain.parse_arch_list("8.0;9.0a 10.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_100,code=sm_100",
        "-gencode=arch=compute_100,code=compute_100",
    ]
    with pytest.raises(toolchain.KernelBuildError, match="'Hopper' is not of the form"):
        toolchain.parse_arch_list("Hopper")


def test_missing_cxx_compiler_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler-g++")
    with pytest.raises(
        toolchain.KernelBuildError, match="C\\+\\+ compiler 'no-such-compiler-g\\+\\+' not found"
    ):
        toolchain.check_cxx_toolchain()


@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only PyTorch has no CUDA version to mismatch")
def test_mismatched_nvcc_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(toolchain, "find_nvcc", lambda: tmp_path / "nvcc")
    monkeypatch.setattr(toolchain, "nvcc_version", lambda nvcc: "9.2")
    with pytest.raises(toolchain.KernelBuildError, match=r"nvcc 9\.2 at .* does not match CUDA"):
        toolchain.check_cuda_toolchain()
    monkeypatch.setattr(toolchain, "find_nvcc", lambda: None)
    with pytest.raises(toolchain.KernelBuildError, match="nvcc not found"):
        toolchain.check_cuda_toolchain()


def test_compile_check_without_nvcc_says_skip(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr(toolchain, "find_nvcc", lambda: None)
    assert toolchain.compile_check("9.0") == 0
    assert "SKIP CUDA compile check: no nvcc found" in capsys.readouterr().out


def test_compile_check_fails_on_a_compile_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys
) -> None:
    """A broken .cu fails the check (nvcc stops at the first error: seconds, not the full build)."""
    if toolchain.find_nvcc() is None or torch.version.cuda is None:
        pytest.skip("no nvcc or a CPU-only PyTorch here")
    (tmp_path / "ms_deform_attn_cuda.cu").write_text("#include <no_such_header.h>\n")
    monkeypatch.setattr(toolchain, "CSRC", tmp_path)
    assert toolchain.compile_check("9.0") == 1
    assert "CUDA compile check FAILED" in capsys.readouterr().out
