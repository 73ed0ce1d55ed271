"""Speed of multi-scale deformable attention: the reference, the fused op and (GPU) the published kernel.

    python -m kernels.bench [--device cpu|cuda] [--dtypes float32 bfloat16 ...] [--shapes enc4_b1 ...]
                            [--json PATH] [--official-kernel-dir DIR] [--warmup N] [--repeats N]

For every shape, dtype and variant it prints the forward and forward+backward times (median of
``--repeats`` after ``--warmup`` runs; CUDA events on a GPU) beside the byte floor: the bytes of the inputs
and outputs moved once, over this device's measured copy bandwidth. It writes the same rows as JSON.

Variants: ``reference`` (:func:`kernels.ms_deform_attn_reference`), ``fused`` (the op, weights given),
``softmax+fused`` (softmax of the logits, then the op: what a model does without the logits variant),
``fused_logits`` (the op with the softmax inside), ``fused_deterministic`` (the op under
``torch.use_deterministic_algorithms(True)``: on a GPU its sort-and-gather backward) and, on a GPU with
``--official-kernel-dir``, ``official``:
Deformable-DETR's published CUDA kernel (float32 / float64 only), built from a copy of its sources that
this script patches for current PyTorch (``.type()`` -> ``.scalar_type()`` / ``.is_cuda()``,
``.data<T>()`` -> ``.data_ptr<T>()``, THC includes dropped) in the ignored ``benchmarks/out/``; the
sources themselves are fetched by hand into an ignored scratch folder and never committed
(``benchmarks/RESULTS.md`` has the commands).

Inputs imitate DINO: encoder queries are all pixels of all levels with their own pixel centre as reference
point, decoder queries a reference box; offsets follow the model's initial pattern (a ring of head
directions at 1..P pixels, or box fractions) plus one pixel of noise; logits are standard normal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

import kernels
from kernels import ops

HEADS, CHANNELS, POINTS = 8, 32, 4
LEVELS_800x1333 = ((100, 167), (50, 84), (25, 42), (13, 21))
LEVELS_1200x2000 = ((150, 250), (75, 125), (38, 63), (19, 32))
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Shape:
    """One benchmark problem (8 heads x 32 channels, 4 points)."""

    name: str
    levels: tuple[tuple[int, int], ...]
    batch: int
    queries: int | None
    """None: the encoder (one query per pixel of every level)."""
    description: str


SHAPES = {
    s.name: s
    for s in (
        Shape("enc4_b1", LEVELS_800x1333, 1, None, "encoder 4-scale 800x1333, batch 1"),
        Shape("enc4_b2", LEVELS_800x1333, 2, None, "encoder 4-scale 800x1333, batch 2"),
        Shape("enc4_1200x2000", LEVELS_1200x2000, 1, None, "encoder 4-scale 1200x2000 (fine-tune), batch 1"),
        Shape("enc5_b1", ((200, 334), *LEVELS_800x1333), 1, None, "encoder 5-scale 800x1333, batch 1"),
        Shape("dec_b1", LEVELS_800x1333, 1, 1100, "decoder 1,100 queries on the 4-scale map, batch 1"),
        Shape("dec_b2", LEVELS_800x1333, 2, 1100, "decoder 1,100 queries on the 4-scale map, batch 2"),
    )
}
DEFAULT_SHAPES = {"cpu": ("enc4_b1", "dec_b1", "dec_b2"), "cuda": tuple(SHAPES)}
DEFAULT_DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("float32", "bfloat16", "float16")}
VARIANTS = ("reference", "fused", "softmax+fused", "fused_logits", "fused_deterministic", "official")


def make_problem(shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """value (N, S, M, D), level table, sampling_locations (N, Lq, M, L, P, 2), logits and weights."""
    g = torch.Generator().manual_seed(seed)
    hw = torch.tensor(shape.levels, dtype=torch.int64)
    sizes = hw[:, 0] * hw[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    n, levels = shape.batch, len(shape.levels)
    wh = hw.flip(-1).float()  # (L, 2) as (W, H)
    angles = torch.arange(HEADS) * (2 * math.pi / HEADS)
    ring = torch.stack([angles.cos(), angles.sin()], -1)
    ring = ring / ring.abs().max(-1, keepdim=True).values  # (M, 2) head directions
    pattern = ring[:, None, None, :] * torch.arange(1, POINTS + 1)[None, None, :, None]  # (M, 1, P, 2)
    if shape.queries is None:
        centres = []
        for h, w in shape.levels:
            ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
            centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(centres).expand(n, -1, -1)  # (N, Lq, 2)
        lq = ref.shape[1]
        pixels = pattern + torch.randn(n, lq, HEADS, levels, POINTS, 2, generator=g)
        loc = ref[:, :, None, None, None, :] + pixels / wh[None, None, None, :, None, :]
    else:
        lq = shape.queries
        centre = 0.05 + 0.9 * torch.rand(n, lq, 2, generator=g)
        size = 0.05 + 0.45 * torch.rand(n, lq, 2, generator=g)
        fractions = pattern / POINTS + 0.2 * torch.randn(n, lq, HEADS, levels, POINTS, 2, generator=g)
        loc = centre[:, :, None, None, None, :] + fractions * size[:, :, None, None, None, :] * 0.5
    logits = torch.randn(n, lq, HEADS, levels, POINTS, generator=g)
    value = torch.randn(n, int(sizes.sum()), HEADS, CHANNELS, generator=g)
    loc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return {
        "value": value.to(device, dtype),
        "spatial_shapes": hw.to(device),
        "level_start_index": starts.to(device),
        "sampling_locations": loc.to(device, loc_dtype).contiguous(),
        "attention_logits": logits.to(device, dtype),
        "attention_weights": logits.flatten(-2).softmax(-1).view_as(logits).to(device, dtype),
        "grad_output": torch.randn(n, lq, HEADS * CHANNELS, generator=g).to(device, dtype),
    }


def variant_function(variant: str, official: object | None) -> Callable[..., torch.Tensor]:
    """(value, shapes, starts, locations, attention) -> output (attention: logits in the logits variants)."""
    if variant == "reference":
        return kernels.ms_deform_attn_reference
    if variant in ("fused", "fused_deterministic"):
        return lambda *a: kernels.ms_deform_attn(*a, implementation="fused")
    if variant == "softmax+fused":

        def softmax_then_fused(value, shapes, starts, loc, logits):
            weights = logits.float().flatten(-2).softmax(-1).view_as(logits).to(logits.dtype)
            return kernels.ms_deform_attn(value, shapes, starts, loc, weights, implementation="fused")

        return softmax_then_fused
    if variant == "fused_logits":
        return lambda *a: kernels.ms_deform_attn_from_logits(*a, implementation="fused")
    if variant == "official":
        return _official_function(official)
    raise ValueError(f"unknown variant {variant!r}")


def _official_function(module: object) -> Callable[..., torch.Tensor]:
    class OfficialMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, loc, weights):
            step = min(64, value.shape[0])
            ctx.save_for_backward(value, shapes, starts, loc, weights)
            return module.ms_deform_attn_forward(value, shapes, starts, loc, weights, step)

        @staticmethod
        def backward(ctx, grad_output):
            value, shapes, starts, loc, weights = ctx.saved_tensors
            step = min(64, value.shape[0])
            grads = module.ms_deform_attn_backward(
                value, shapes, starts, loc, weights, grad_output.contiguous(), step
            )
            return grads[0], None, None, grads[1], grads[2]

    return OfficialMSDA.apply


def patch_official_sources(source_dir: Path, work: Path) -> list[Path]:
    """Copies Deformable-DETR's ``models/ops/src`` (or DINO's ``models/dino/ops/src``) into ``work``, patched
    for current PyTorch; returns the copied .cpp / .cu files."""
    src = source_dir / "src" if (source_dir / "src").is_dir() else source_dir
    files = sorted(p for p in src.rglob("*") if p.suffix in (".cpp", ".cu", ".h", ".cuh"))
    if not any(p.name == "vision.cpp" for p in files):
        raise SystemExit(
            f"--official-kernel-dir {source_dir}: no src/vision.cpp (pass Deformable-DETR's models/ops)"
        )
    for path in files:
        text = path.read_text()
        text = re.sub(r"^\s*#include\s*[<\"]THC/.*$", "", text, flags=re.MULTILINE)
        text = text.replace(".type().is_cuda()", ".is_cuda()").replace(".type()", ".scalar_type()")
        text = re.sub(r"\.data<", ".data_ptr<", text)
        target = work / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return [work / p.relative_to(src) for p in files if p.suffix in (".cpp", ".cu")]


def build_official(source_dir: Path) -> object:
    """The published kernel as a Python extension (``ms_deform_attn_forward`` / ``_backward``), with CUDA."""
    work = REPO / "benchmarks" / "out" / "official_msda_src"
    sources = [str(p) for p in patch_official_sources(source_dir, work)]
    from torch.utils import cpp_extension

    build_dir = REPO / "benchmarks" / "out" / "official_msda_build"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        "official_msda",
        sources,
        extra_include_paths=[str(work)],
        extra_cflags=["-O3", "-DWITH_CUDA"],
        extra_cuda_cflags=["-O3", "-DWITH_CUDA"],
        build_directory=str(build_dir),
    )


def time_ms(fn: Callable[[], object], device: str, warmup: int, repeats: int) -> float:
    """Median wall time of fn in milliseconds (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - began) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large same-device copy (read plus write)."""
    numel = (256 << 20) // 4 if device == "cuda" else (64 << 20) // 4
    src = torch.empty(numel, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, repeats=10 if device == "cuda" else 5)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def floor_bytes(problem: dict[str, torch.Tensor], backward: bool) -> int:
    """Inputs and outputs moved once: forward reads value, locations, weights and writes the output; the
    backward also reads grad_output and the inputs again and writes a gradient of each input."""

    def size(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    inputs = sum(size(problem[k]) for k in ("value", "sampling_locations", "attention_weights"))
    output = size(problem["grad_output"])
    return inputs + output + (2 * inputs + output if backward else 0)


def measure(
    problem: dict[str, torch.Tensor],
    variant: str,
    official: object | None,
    device: str,
    warmup: int,
    repeats: int,
) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one variant."""
    fn = variant_function(variant, official)
    attention = problem[
        "attention_logits" if variant in ("softmax+fused", "fused_logits") else "attention_weights"
    ]
    args = (
        problem["value"],
        problem["spatial_shapes"],
        problem["level_start_index"],
        problem["sampling_locations"],
    )
    leaves = [t.detach().clone().requires_grad_() for t in (args[0], args[3], attention)]

    def forward() -> None:
        with torch.no_grad():
            fn(*args, attention)

    def forward_backward() -> None:
        out = fn(leaves[0], args[1], args[2], leaves[1], leaves[2])
        torch.autograd.grad(out, leaves, problem["grad_output"])

    with deterministic_mode(variant == "fused_deterministic"):
        return time_ms(forward, device, warmup, repeats), time_ms(forward_backward, device, warmup, repeats)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms(enabled) inside the block, without its NaN fill of new tensors
    (which would be timed too)."""
    before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(enabled)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before


@dataclass
class Row:
    shape: str
    dtype: str
    variant: str
    forward_ms: float
    forward_backward_ms: float
    floor_forward_ms: float
    floor_forward_backward_ms: float
    speedup_forward: float | None
    speedup_forward_backward: float | None


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.MULTILINE)
        model = names[0] if names else model
    return f"{model}, {torch.get_num_threads()} threads"


def format_table(rows: list[Row]) -> str:
    header = (
        "| shape | dtype | variant | forward ms | fwd+bwd ms | floor fwd / fwd+bwd ms "
        "| speed-up fwd / fwd+bwd |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        speedup = (
            ""
            if r.speedup_forward is None
            else f"{r.speedup_forward:.1f}x / {r.speedup_forward_backward:.1f}x"
        )
        lines.append(
            f"| {r.shape} | {r.dtype} | {r.variant} | {r.forward_ms:.3f} | {r.forward_backward_ms:.3f} | "
            f"{r.floor_forward_ms:.3f} / {r.floor_forward_backward_ms:.3f} | {speedup} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, help="default: benchmarks/out/msda_<device>.json")
    parser.add_argument("--official-kernel-dir", type=Path, help="Deformable-DETR's models/ops (GPU only)")
    parser.add_argument("--warmup", type=int, help="default: 10 on a GPU, 1 on the CPU")
    parser.add_argument("--repeats", type=int, help="default: 50 on a GPU, 3 on the CPU")
    args = parser.parse_args(argv)
    device = args.device
    warmup = args.warmup if args.warmup is not None else (10 if device == "cuda" else 1)
    repeats = args.repeats if args.repeats is not None else (50 if device == "cuda" else 3)
    ops.load(device, build_if_missing=True)
    official = None
    variants = [v for v in args.variants if v != "official"]
    if "official" in args.variants and args.official_kernel_dir is not None:
        if device != "cuda":
            raise SystemExit("--official-kernel-dir: the published kernel is CUDA-only")
        official = build_official(args.official_kernel_dir)
        variants.append("official")
    bandwidth = copy_bandwidth(device)
    meta = {
        "device": device_description(device),
        "date": date.today().isoformat(),
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "warmup": warmup,
        "repeats": repeats,
    }
    print(
        f"# {meta['device']}, torch {meta['torch']}, {meta['date']}; "
        f"copy {meta['copy_bandwidth_GBps']:.1f} GB/s"
    )
    rows: list[Row] = []
    for shape_name in args.shapes or DEFAULT_SHAPES[device]:
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes or DEFAULT_DTYPES[device]:
            dtype = getattr(torch, dtype_name)
            problem = make_problem(shape, dtype, device)
            floors = [floor_bytes(problem, backward) / bandwidth * 1e3 for backward in (False, True)]
            baseline: tuple[float, float] | None = None
            for variant in variants:
                if variant == "official" and dtype not in (torch.float32, torch.float64):
                    continue
                fwd, fwd_bwd = measure(problem, variant, official, device, warmup, repeats)
                if variant == "reference":
                    baseline = (fwd, fwd_bwd)
                speedups = (None, None) if baseline is None else (baseline[0] / fwd, baseline[1] / fwd_bwd)
                row = Row(shape_name, dtype_name, variant, fwd, fwd_bwd, *floors, *speedups)
                rows.append(row)
                print(format_table([row]).splitlines()[-1], flush=True)
            del problem
            if device == "cuda":
                torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    out = args.json or REPO / "benchmarks" / "out" / f"msda_{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
