"""Compiles and finds the ``dino_kernels`` operator libraries: once, cached (the CLI is :mod:`kernels.build`).

Two shared libraries, compiled just in time with ``torch.utils.cpp_extension.load`` (ninja):

- ``cpu``: the operator schemas and the CPU kernels (``csrc/ms_deform_attn.cpp``, ``ms_deform_attn_cpu.cpp``);
  needs a C++ compiler only.
- ``cuda``: the CUDA kernels (``csrc/ms_deform_attn_cuda.cu``); needs ``nvcc`` of the CUDA major version
  PyTorch was built with. Built for ``TORCH_CUDA_ARCH_LIST`` (default: the visible GPUs).

A library lives in ``<root>/<name>/`` where the name carries a hash of its sources, flags, PyTorch and Python
versions and CUDA arch list, so a change rebuilds and an unchanged setup loads the cached file without
running a compiler. ``<root>`` is ``$TORCH_EXTENSIONS_DIR/dino_kernels`` when that is set, else
``kernels/_build`` (git-ignored; ``make clean`` removes it). Concurrent builders (e.g. two ranks) wait on
cpp_extension's file lock.

CPU flags: the build targets the instruction set PyTorch itself dispatches to on this machine
(``torch.backends.cpu.get_cpu_capability()``: AVX512 / AVX2 / default) instead of ``-march=native``; the
capability is part of the hash, so a cache shared between different machines never loads a binary built
for instructions a CPU lacks.

Importing this module compiles nothing and does not import ``torch.utils.cpp_extension`` (whose import
looks for CUDA).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"
HEADERS = ("ms_deform_attn.h",)
SOURCES = {
    "cpu": ("ms_deform_attn.cpp", "ms_deform_attn_cpu.cpp"),
    "cuda": ("ms_deform_attn_cuda.cu",),
}
BUILD_ENV = "DINO_KERNELS_BUILD"
COMPILE_CHECK_ARCHS = "8.0;9.0"

_CPU_ISA_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    "AVX2": ("-mavx2", "-mfma", "-mf16c"),
}
# The NVCC_FLAGS cpp_extension adds to every CUDA build; the compile check passes them too, so it sees the
# same half / bfloat16 operator environment as the real build.
_TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)


class KernelBuildError(RuntimeError):
    """The fused kernels are not built and cannot be built here (the message says why and how to fix it)."""


@dataclass(frozen=True)
class LibrarySpec:
    """Everything that identifies one built library."""

    target: str
    """``"cpu"`` or ``"cuda"``."""
    name: str
    """Library name, ``dino_msda_<target>_<hash>``."""
    directory: Path
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    ldflags: tuple[str, ...]

    @property
    def library(self) -> Path:
        return self.directory / f"{self.name}.so"

    @property
    def stamp(self) -> Path:
        """Written after a build loaded successfully; a library without it may be half-written."""
        return self.directory / "complete"


def build_enabled() -> bool:
    """Whether first use may compile (``DINO_KERNELS_BUILD``: ``1`` (default) or ``0``)."""
    raw = os.environ.get(BUILD_ENV, "1").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{BUILD_ENV}={raw!r}: expected 1 or 0")


def build_root() -> Path:
    extensions_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    if extensions_dir:
        return Path(extensions_dir) / "dino_kernels"
    return Path(__file__).resolve().parent / "_build"


def cpu_capability_flags() -> tuple[str, ...]:
    return _CPU_ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())


def parse_arch_list(arch_list: str) -> list[str]:
    """``"8.0;9.0+PTX"`` (``;``, ``,`` or space separated) -> nvcc ``-gencode`` flags."""
    flags = []
    for arch in re.split(r"[;,\s]+", arch_list.strip()):
        if not arch:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if match is None:
            raise KernelBuildError(
                f"TORCH_CUDA_ARCH_LIST entry {arch!r} is not of the form 8.0, 9.0a or 9.0+PTX"
            )
        major, minor, suffix, ptx = match.groups()
        num = f"{major}{minor}{suffix}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise KernelBuildError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags


def cuda_arch_list() -> str:
    """``TORCH_CUDA_ARCH_LIST``, else the compute capabilities of the visible GPUs."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if arch_list and arch_list != "native":
        return arch_list
    if not torch.cuda.is_available():
        raise KernelBuildError(
            "no GPU is visible to choose CUDA architectures for; set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0')"
        )
    capabilities = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in capabilities)


def find_nvcc() -> Path | None:
    """nvcc as cpp_extension finds it: ``$CUDA_HOME`` / ``$CUDA_PATH``, ``PATH``, then /usr/local/cuda."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidate = Path(cuda_home) / "bin" / "nvcc"
        return candidate if candidate.exists() else None
    on_path = shutil.which("nvcc")
    if on_path:
        return Path(on_path)
    fallback = Path("/usr/local/cuda/bin/nvcc")
    return fallback if fallback.exists() else None


def nvcc_version(nvcc: Path) -> str:
    """``"13.0"`` from ``nvcc --version``."""
    result = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"release (\d+\.\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise KernelBuildError(f"{nvcc} --version failed: {result.stdout}{result.stderr}")
    return match.group(1)


def check_cuda_toolchain() -> Path:
    """The nvcc to use; raises with the fix when it is missing or does not match PyTorch's CUDA."""
    if torch.version.cuda is None:
        raise KernelBuildError(
            f"PyTorch {torch.__version__} is a CPU-only build: the CUDA kernels need a CUDA build of PyTorch"
        )
    nvcc = find_nvcc()
    if nvcc is None:
        raise KernelBuildError(
            f"nvcc not found (looked at $CUDA_HOME, $CUDA_PATH, PATH and /usr/local/cuda): install the CUDA "
            f"{torch.version.cuda} toolkit and set CUDA_HOME, or set {BUILD_ENV}=0 to use the reference"
        )
    found = nvcc_version(nvcc)
    if found.split(".")[0] != torch.version.cuda.split(".")[0]:
        raise KernelBuildError(
            f"nvcc {found} at {nvcc} does not match CUDA {torch.version.cuda}, which PyTorch "
            f"{torch.__version__} was built with: install a CUDA {torch.version.cuda.split('.')[0]}.x "
            "toolkit and point CUDA_HOME at it"
        )
    return nvcc


def check_cxx_toolchain() -> None:
    """Raises with the fix when the C++ compiler or ninja that cpp_extension will call is missing."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise KernelBuildError(
            f"C++ compiler {cxx!r} not found (cpp_extension uses $CXX, default c++): install g++ "
            f"(e.g. apt-get install g++) or set CXX, or set {BUILD_ENV}=0 to use the PyTorch reference"
        )
    if shutil.which("ninja") is None:
        raise KernelBuildError(
            f"ninja not found: pip install ninja, or set {BUILD_ENV}=0 to use the PyTorch reference"
        )


def cuda_cflags(arch_list: str) -> list[str]:
    return ["-O3", "--threads=0", *parse_arch_list(arch_list)]


def library_spec(target: str) -> LibrarySpec:
    """The spec of the ``target`` library for this machine's PyTorch, compiler flags and sources."""
    if target not in SOURCES:
        raise ValueError(f"target must be one of {sorted(SOURCES)}, got {target!r}")
    sources = tuple(CSRC / name for name in SOURCES[target])
    if target == "cpu":
        cflags = ("-O3", "-fopenmp", *cpu_capability_flags())
        ldflags: tuple[str, ...] = ("-fopenmp",)
        cuda_flags: tuple[str, ...] = ()
        identity = [torch.backends.cpu.get_cpu_capability()]
    else:
        arch_list = cuda_arch_list()
        cflags = ("-O3",)
        ldflags = ()
        cuda_flags = tuple(cuda_cflags(arch_list))
        identity = [str(torch.version.cuda), arch_list]
    digest = hashlib.sha256()
    for path in sorted((*sources, *(CSRC / name for name in HEADERS))):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for part in (
        target,
        torch.__version__,
        sys.version.split()[0],
        *identity,
        *cflags,
        *cuda_flags,
        *ldflags,
    ):
        digest.update(part.encode())
    name = f"dino_msda_{target}_{digest.hexdigest()[:16]}"
    return LibrarySpec(target, name, build_root() / name, sources, cflags, cuda_flags, ldflags)


def library(target: str, *, build: bool) -> Path:
    """Path of the built ``target`` library, compiling it first when needed and ``build`` is true.

    Raises :class:`KernelBuildError` when it is not built and cannot (or may not) be built here.
    """
    spec = library_spec(target)
    if spec.stamp.exists() and spec.library.exists():
        return spec.library
    if not build:
        raise KernelBuildError(
            f"the {target} kernels are not built ({spec.library} is missing) and {BUILD_ENV}=0 forbids "
            "building on first use: run `python -m kernels.build`"
        )
    check_cxx_toolchain()
    if target == "cuda":
        check_cuda_toolchain()
    spec.directory.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension  # imported here: its import probes for CUDA

    started = time.monotonic()
    print(f"kernels.build: compiling {spec.name} (once; cached in {spec.directory}) ...", file=sys.stderr)
    try:
        path = cpp_extension.load(
            name=spec.name,
            sources=[str(s) for s in spec.sources],
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags),
            build_directory=str(spec.directory),
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, subprocess.CalledProcessError) as err:
        raise KernelBuildError(f"compiling {spec.name} in {spec.directory} failed:\n{err}") from err
    if Path(path) != spec.library:
        raise KernelBuildError(f"cpp_extension built {path}, expected {spec.library}")
    spec.stamp.write_text(f"{torch.__version__}\n")
    print(f"kernels.build: {spec.name} built in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return spec.library


def compile_check(arch_list: str) -> int:
    """nvcc-compile every CUDA source to an object file (no link, no GPU); returns a process exit code."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("kernels.build: SKIP CUDA compile check: no nvcc found (set CUDA_HOME or put nvcc on PATH)")
        return 0
    if torch.version.cuda is None:
        print(f"kernels.build: SKIP CUDA compile check: PyTorch {torch.__version__} is a CPU-only build")
        return 0
    torch_include = Path(torch.__file__).resolve().parent / "include"
    includes = [f"-I{torch_include}", f"-I{torch_include / 'torch' / 'csrc' / 'api' / 'include'}"]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    with tempfile.TemporaryDirectory(prefix="dino_kernels_check_") as tmp:
        for source in SOURCES["cuda"]:
            command = [
                str(nvcc), "-c", str(CSRC / source), "-o", str(Path(tmp) / f"{source}.o"),
                "-std=c++20", "-Xcompiler", "-fPIC", abi, *_TORCH_NVCC_FLAGS, *cuda_cflags(arch_list),
                *includes,
            ]  # fmt: skip
            started = time.monotonic()
            result = subprocess.run(command, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                print(f"kernels.build: CUDA compile check FAILED for {source}:\n{' '.join(command)}\n")
                print(result.stdout + result.stderr)
                return 1
            warnings = result.stderr.strip()
            if warnings:
                print(warnings)
            print(
                f"kernels.build: CUDA compile check OK: {source} with nvcc {nvcc_version(nvcc)} for "
                f"{arch_list} in {time.monotonic() - started:.0f} s"
            )
    return 0
