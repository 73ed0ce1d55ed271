"""The fused multi-scale deformable attention op against the reference, on the CPU and (``cuda``) a GPU.

Every check draws fresh inputs (seeded from the test id) in float64, rounds them to the dtype under test,
and compares the op with the float64 reference evaluated on those rounded inputs, so a tolerance measures
the op's own arithmetic only:

- float64: 1e-12 relative to the tensor's largest entry (summation order only).
- float32: 1e-5 relative, elementwise, plus 1e-5 of the tensor's largest entry (fp32 sums of at most a few
  hundred products; near-zero entries are bounded by the size of the terms, not of the result).
- float16 / bfloat16: the op accumulates in float32 and rounds each returned element once, so the bound is
  one rounding, u = 2^-11 (fp16) / 2^-8 (bf16) relative (round to nearest: half an ulp), plus the float32
  term. Gradients of the sampling locations are float32 in every case and get the float32 tolerance.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

import kernels
from kernels import ops
from kernels.reference import ms_deform_attn_from_logits_reference, ms_deform_attn_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# Unit roundoff of the returned dtype (the one rounding of a float32 result).
ROUNDING = {torch.float64: 0.0, torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ARITHMETIC = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}


@dataclass(frozen=True)
class Case:
    """One problem size; locations are drawn uniformly from [low, high]."""

    shapes: tuple[tuple[int, int], ...]
    n: int = 2
    lq: int = 13
    m: int = 2
    d: int = 32
    p: int = 4
    low: float = 0.0
    high: float = 1.0


CASES = {
    "dino_like": Case(((12, 17), (6, 9), (3, 5), (2, 3)), m=8),
    "channels30_nonsquare_1x1": Case(((7, 5), (1, 1)), d=30),
    "channels64": Case(((9, 4), (3, 3)), d=64, p=3),
    "channels71_odd": Case(((5, 6), (2, 2)), d=71, m=1, p=2),
    "five_levels": Case(((16, 10), (8, 5), (4, 3), (2, 2), (1, 1)), d=16),
    "one_level_one_query": Case(((6, 7),), n=1, lq=1, p=1),
    "outside_the_map": Case(((6, 4), (3, 2), (1, 1)), low=-0.7, high=1.7),
}


def seed_of(request: pytest.FixtureRequest) -> int:
    return zlib.crc32(request.node.nodeid.encode())


def make_inputs(case: Case, dtype: torch.dtype, device: str, seed: int) -> dict[str, torch.Tensor]:
    """value (N, S, M, D), level table, sampling_locations (N, Lq, M, L, P, 2), weights and logits."""
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(case.shapes, dtype=torch.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    levels = len(case.shapes)
    f64 = torch.float64
    value = torch.randn(case.n, int(sizes.sum()), case.m, case.d, generator=g, dtype=f64)
    loc = torch.rand(case.n, case.lq, case.m, levels, case.p, 2, generator=g, dtype=f64)
    loc = case.low + (case.high - case.low) * loc
    logits = 2 * torch.randn(case.n, case.lq, case.m, levels, case.p, generator=g, dtype=f64)
    weights = logits.flatten(-2).softmax(-1).view_as(logits)
    loc_dtype = f64 if dtype == f64 else torch.float32
    return {
        "value": value.to(device, dtype),
        "spatial_shapes": shapes.to(device),
        "level_start_index": starts.to(device),
        "sampling_locations": loc.to(device, loc_dtype),
        "attention_weights": weights.to(device, dtype),
        "attention_logits": logits.to(device, dtype),
    }


def run(inputs: dict[str, torch.Tensor], logits: bool, implementation: str, grad_output: torch.Tensor | None):
    """Output and, when grad_output is given, gradients of value, locations and attention."""
    attention = inputs["attention_logits" if logits else "attention_weights"]
    leaves = [
        t.detach().clone().requires_grad_(grad_output is not None)
        for t in (inputs["value"], inputs["sampling_locations"], attention)
    ]
    fn = kernels.ms_deform_attn_from_logits if logits else kernels.ms_deform_attn
    out = fn(
        leaves[0],
        inputs["spatial_shapes"],
        inputs["level_start_index"],
        leaves[1],
        leaves[2],
        implementation=implementation,
    )
    if grad_output is None:
        return out.detach(), ()
    out.backward(grad_output)
    return out.detach(), tuple(t.grad for t in leaves)


def reference64(inputs: dict[str, torch.Tensor], logits: bool, grad_output: torch.Tensor | None):
    """The reference in float64 on the (already rounded) inputs, on the CPU."""
    as64 = {k: (v.cpu().double() if v.is_floating_point() else v.cpu()) for k, v in inputs.items()}
    go = None if grad_output is None else grad_output.cpu().double()
    return run(as64, logits, "reference", go)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """|actual - expected| <= (u + a) |expected| + a max|expected|, u and a per dtype (module docstring)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    actual, expected = actual.cpu().double(), expected.double()
    scale = expected.abs().max().item()
    bound = (ROUNDING[dtype] + ARITHMETIC[dtype]) * expected.abs() + ARITHMETIC[dtype] * scale
    excess = (actual - expected).abs() - bound
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 0, (
        f"{what} ({dtype}): |error| {(actual - expected).abs().flatten()[worst]:.3g} exceeds its bound "
        f"{bound.flatten()[worst]:.3g} at flat index {worst} (expected {expected.flatten()[worst]:.6g})"
    )


@contextlib.contextmanager
def deterministic(warn_only: bool = False) -> Iterator[None]:
    """torch.use_deterministic_algorithms(True) inside the block (it also fills torch.empty with NaN)."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.fixture(scope="module", params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """A device whose fused op is loaded (built once per session and cached in kernels/_build)."""
    ops.load(request.param, build_if_missing=True)
    return request.param


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("logits", [False, True], ids=["weights", "logits"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(
    device: str, dtype: torch.dtype, logits: bool, case_name: str, request: pytest.FixtureRequest
) -> None:
    inputs = make_inputs(CASES[case_name], dtype, device, seed_of(request))
    out_shape = inputs["value"].shape[:1] + inputs["sampling_locations"].shape[1:2] + (-1,)
    grad_output = torch.randn_like(inputs["value"].flatten(2)[:, :1].expand(*out_shape).contiguous())
    out, grads = run(inputs, logits, "fused", grad_output)
    ref_out, ref_grads = reference64(inputs, logits, grad_output)
    assert out.shape == ref_out.shape
    assert_within(out, ref_out, dtype, "output")
    names = ("grad value", "grad sampling_locations", "grad attention")
    loc_dtype = inputs["sampling_locations"].dtype
    for name, grad, ref, want in zip(names, grads, ref_grads, (dtype, loc_dtype, dtype)):
        assert_within(grad, ref, want, name)


def test_borders_and_far_outside(device: str) -> None:
    """Locations on the map's borders, on the pixel grid (where one corner weight is exactly 0 but its value
    still carries a location gradient, as in grid_sample), just and far outside. Maps are powers of two so
    every coordinate below is exact in both the op's and grid_sample's arithmetic."""
    case = Case(((4, 8), (2, 1)), n=1, lq=1, m=1, d=8, p=10)
    inputs = make_inputs(case, torch.float64, device, seed=7)
    rows = []
    for h, w in case.shapes:
        px, py = 1.0 / w, 1.0 / h  # one pixel in normalised units
        rows.append(
            [
                [0.0, 0.0],
                [1.0, 1.0],
                [0.0, 1.0],  # corners of the map
                [-0.5 * px, 0.5],
                [0.5, -0.5 * py],  # pixel coordinate exactly -1: only the far corner is inside
                [1.0 + 0.5 * px, 0.5],  # exactly W: nothing inside
                [0.5 * px, 0.5 * py],
                [1.0 - 0.5 * px, 1.0 - 0.5 * py],  # centres of the first and last pixel
                [-5.0, 0.5],
                [0.5, 40.0],  # far outside
            ]
        )
    special = torch.tensor(rows, dtype=torch.float64)  # (L, P, 2)
    inputs["sampling_locations"] = special.expand_as(inputs["sampling_locations"]).contiguous().to(device)
    grad_output = torch.randn(1, 1, 8, dtype=torch.float64, device=device)
    out, grads = run(inputs, False, "fused", grad_output)
    ref_out, ref_grads = reference64(inputs, False, grad_output)
    assert_within(out, ref_out, torch.float64, "output")
    for name, grad, ref in zip(("value", "sampling_locations", "attention"), grads, ref_grads):
        assert_within(grad, ref, torch.float64, f"grad {name}")
    # Pixel coordinate -1 reads nothing yet moves the point; far outside does neither.
    assert (grads[1][..., 3:5, :] != 0).any()
    assert (grads[1][..., 8:, :] == 0).all() and (grads[2][..., 8:] == 0).all()


@pytest.mark.parametrize("logits", [False, True], ids=["weights", "logits"])
def test_gradcheck_float64(device: str, logits: bool) -> None:
    inputs = make_inputs(
        Case(((4, 5), (2, 3), (1, 1)), n=1, lq=3, m=2, d=3, p=2, low=-0.1, high=1.1),
        torch.float64,
        device,
        seed=11,
    )
    attention = inputs["attention_logits" if logits else "attention_weights"]
    fn = kernels.ms_deform_attn_from_logits if logits else kernels.ms_deform_attn

    def f(value: torch.Tensor, loc: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        return fn(
            value, inputs["spatial_shapes"], inputs["level_start_index"], loc, att, implementation="fused"
        )

    leaves = [t.clone().requires_grad_() for t in (inputs["value"], inputs["sampling_locations"], attention)]
    # Atomic float64 additions on a GPU may differ in the last bits between the two backward calls.
    assert torch.autograd.gradcheck(f, leaves, nondet_tol=0.0 if device == "cpu" else 1e-12)


def test_outputs_are_written_everywhere(device: str) -> None:
    """With deterministic mode's NaN fill of uninitialised memory (and, on a GPU, a NaN-poisoned cache), every
    element of every output is written: none stays NaN."""
    case = Case(((8, 8), (4, 4), (2, 2)), n=2, lq=50, m=4, d=32, p=4, low=-0.3, high=1.3)
    inputs = make_inputs(case, torch.bfloat16, device, seed=3)
    if device == "cuda":
        poison = torch.full((64 << 20,), float("nan"), device=device)
        del poison  # its blocks go back to the caching allocator still holding NaN
    with deterministic():
        out, grads = run(inputs, True, "fused", torch.ones(2, 50, 128, dtype=torch.bfloat16, device=device))
    for t in (out, *grads):
        assert not t.isnan().any()


def test_batch_larger_than_any_internal_chunk(device: str) -> None:
    """More (batch, query, head) groups than one pass of the CPU's parallel chunks or the GPU's grid holds."""
    if device == "cuda":
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        # fp32, D = 32: 8 lanes per group; the grid holds at most 32 blocks of 256 threads per SM.
        lq = 2 * (32 * 256 * sms // 8) // (4 * 8) + 1
        case = Case(((16, 16), (8, 8)), n=4, lq=lq, m=8, d=32, p=2)
    else:
        case = Case(((16, 16), (8, 8)), n=3, lq=700, m=2, d=16, p=2)
    inputs = make_inputs(case, torch.float32, device, seed=5)
    grad_output = torch.randn(case.n, case.lq, case.m * case.d, device=device)
    out, grads = run(inputs, False, "fused", grad_output)
    ref_out, ref_grads = reference64(inputs, False, grad_output)
    assert_within(out, ref_out, torch.float32, "output")
    for grad, ref, want in zip(grads, ref_grads, (torch.float32,) * 3):
        assert_within(grad, ref, want, "gradient")


@pytest.mark.parametrize(("n", "lq"), [(0, 5), (2, 0)], ids=["empty_batch", "no_queries"])
def test_empty_batch_or_queries(device: str, n: int, lq: int) -> None:
    inputs = make_inputs(Case(((3, 4), (1, 2)), n=n, lq=lq, d=8), torch.float32, device, seed=37)
    grad_output = torch.zeros(n, lq, 16, device=device)
    out, grads = run(inputs, False, "fused", grad_output)
    assert out.shape == (n, lq, 16)
    names = ("value", "sampling_locations", "attention_weights")
    assert [g.shape for g in grads] == [inputs[k].shape for k in names]
    assert all((g == 0).all() for g in grads)


def test_deterministic(device: str) -> None:
    """Under torch.use_deterministic_algorithms(True) the forward and the backward are bitwise reproducible:
    the CUDA backward gathers from sorted points instead of adding with atomics; the CPU one has no atomics
    and gives the same bits at any thread count."""
    inputs = make_inputs(CASES["dino_like"], torch.float32, device, seed=9)
    grad_output = torch.randn(2, 13, 256, device=device)
    with deterministic():
        first = run(inputs, False, "fused", grad_output)
        again = run(inputs, False, "fused", grad_output)
        for a, b in zip((first[0], *first[1]), (again[0], *again[1])):
            assert torch.equal(a, b)
        if device == "cuda":
            return
        threads = torch.get_num_threads()
        try:
            per_thread_count = []
            for count in (1, 3):  # 3 threads split the 2 * 8 (batch, head) tasks unevenly
                torch.set_num_threads(count)
                per_thread_count.append(run(inputs, False, "fused", grad_output)[1])
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*per_thread_count):
        assert torch.equal(a, b)


@pytest.mark.parametrize("logits", [False, True], ids=["weights", "logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "case", ["dino_like", "outside_the_map", "channels71_odd", "channels30_nonsquare_1x1"]
)
def test_deterministic_backward_matches_reference(
    device: str, case: str, dtype: torch.dtype, logits: bool
) -> None:
    """The deterministic CUDA backward (sort and gather) is a second implementation: it meets the same
    tolerances as the default one: points outside the map, odd channel counts (several passes over D), a
    single-pixel level."""
    inputs = make_inputs(CASES[case], dtype, device, seed=41)
    c = CASES[case]
    grad_output = torch.randn(c.n, c.lq, c.m * c.d, device=device).to(dtype)
    with deterministic():
        _, grads = run(inputs, logits, "fused", grad_output)
    _, ref_grads = reference64(inputs, logits, grad_output)
    for grad, ref, want in zip(grads, ref_grads, (dtype, torch.float32, dtype)):
        assert_within(grad, ref, want, "gradient")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("op_name", ["ms_deform_attn", "ms_deform_attn_from_logits"])
def test_opcheck(device: str, op_name: str, dtype: torch.dtype) -> None:
    inputs = make_inputs(Case(((5, 6), (3, 2)), n=2, lq=4, m=2, d=8, p=2), dtype, device, seed=13)
    attention = inputs["attention_logits" if op_name.endswith("logits") else "attention_weights"]
    args = (
        inputs["value"].requires_grad_(),
        inputs["spatial_shapes"],
        inputs["level_start_index"],
        inputs["sampling_locations"].requires_grad_(),
        attention.requires_grad_(),
    )
    torch.library.opcheck(getattr(torch.ops.dino_kernels, op_name).default, args)


def test_backward_opcheck(device: str) -> None:
    inputs = make_inputs(Case(((5, 6), (3, 2)), n=1, lq=4, m=2, d=8, p=2), torch.float32, device, seed=17)
    args = (
        torch.randn(1, 4, 16, device=device),
        inputs["value"],
        inputs["spatial_shapes"],
        inputs["level_start_index"],
        inputs["sampling_locations"],
        inputs["attention_logits"],
        True,
    )
    torch.library.opcheck(
        torch.ops.dino_kernels.ms_deform_attn_backward.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"),
    )


def test_torch_compile_fullgraph(device: str) -> None:
    """The public function traces into one graph around the op (aot_eager: fake tensors and AOT autograd,
    without inductor's C++ compile time) and gives the eager gradients."""
    inputs = make_inputs(CASES["channels30_nonsquare_1x1"], torch.float32, device, seed=19)

    def f(value: torch.Tensor, loc: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        out = kernels.ms_deform_attn_from_logits(
            value, inputs["spatial_shapes"], inputs["level_start_index"], loc, logits.flatten(-2)
        )
        return (out * out).sum()

    graphs: list[torch.fx.GraphModule] = []

    def recording(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    args = [inputs[k].clone().requires_grad_() for k in ("value", "sampling_locations", "attention_logits")]
    torch.compile(f, backend=recording, fullgraph=True)(*args)
    assert len(graphs) == 1 and "dino_kernels.ms_deform_attn_from_logits" in graphs[0].code
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    eager_args = [a.detach().clone().requires_grad_() for a in args]
    compiled(*args).backward()
    f(*eager_args).backward()
    for a, b in zip(args, eager_args):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing(device: str) -> None:
    """Recomputing the op inside torch.utils.checkpoint gives the gradients of the plain graph."""
    inputs = make_inputs(CASES["five_levels"], torch.float32, device, seed=31)
    table = (inputs["spatial_shapes"], inputs["level_start_index"])

    def block(value: torch.Tensor, loc: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return kernels.ms_deform_attn(value, *table, loc, weights, implementation="fused").tanh()

    grads = []
    names = ("value", "sampling_locations", "attention_weights")
    for checkpointed in (False, True):
        leaves = [inputs[k].clone().requires_grad_() for k in names]
        if checkpointed:
            out = torch.utils.checkpoint.checkpoint(block, *leaves, use_reentrant=False)
        else:
            out = block(*leaves)
        out.square().sum().backward()
        grads.append([t.grad for t in leaves])
    # Bitwise on the CPU; the GPU's value-gradient atomics may add in another order.
    tolerance = 0.0 if device == "cpu" else 1e-6
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=tolerance, atol=tolerance)


def test_implementation_switch(device: str) -> None:
    inputs = make_inputs(CASES["channels30_nonsquare_1x1"], torch.float32, device, seed=23)
    args = [inputs[k] for k in ("value", "spatial_shapes", "level_start_index", "sampling_locations")]
    weights = inputs["attention_weights"]
    fused = torch.ops.dino_kernels.ms_deform_attn(*args, weights)
    assert torch.equal(kernels.ms_deform_attn(*args, weights), fused)  # "auto" with the op loaded
    assert torch.equal(kernels.ms_deform_attn(*args, weights, implementation="fused"), fused)
    reference = ms_deform_attn_reference(*args, weights)
    assert torch.equal(kernels.ms_deform_attn(*args, weights, implementation="reference"), reference)
    logits = inputs["attention_logits"]
    assert torch.equal(
        kernels.ms_deform_attn_from_logits(*args, logits.flatten(-2), implementation="reference"),
        ms_deform_attn_from_logits_reference(*args, logits),
    )
    with pytest.raises(ValueError, match="implementation must be"):
        kernels.ms_deform_attn(*args, weights, implementation="cuda")


def _inputs_for_errors(device: str) -> dict[str, torch.Tensor]:
    return make_inputs(Case(((3, 4), (2, 2)), n=1, lq=2, m=2, d=4, p=2), torch.float32, device, seed=29)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda i: i.update(value=i["value"][0]), ValueError, r"value must be \(N, S, M, D\)"),
        (lambda i: i.update(value=i["value"][:, :-1]), ValueError, "S = 15 positions but spatial_shapes"),
        (
            lambda i: i.update(sampling_locations=i["sampling_locations"][..., :1]),
            ValueError,
            "sampling_locations",
        ),
        (
            lambda i: i.update(attention_weights=i["attention_weights"][..., :1]),
            ValueError,
            "attention_weights must",
        ),
        (
            lambda i: i.update(spatial_shapes=i["spatial_shapes"][:1]),
            ValueError,
            r"spatial_shapes must be \(L, 2\)",
        ),
        (
            lambda i: i.update(level_start_index=i["level_start_index"] + 1),
            ValueError,
            "not the start of each",
        ),
        (lambda i: i.update(value=i["value"].half()), TypeError, "attention_weights must have value's dtype"),
        (
            lambda i: i.update(sampling_locations=i["sampling_locations"].half()),
            TypeError,
            "must be torch.float32",
        ),
        (lambda i: i.update(spatial_shapes=i["spatial_shapes"].int()), TypeError, "must be int64"),
        (lambda i: i.update(value=i["value"].int()), TypeError, "value must be float32"),
    ],
    ids=[
        "value_dims",
        "S_mismatch",
        "loc_last_dim",
        "weights_shape",
        "levels",
        "starts",
        "mixed_dtypes",
        "loc_dtype",
        "shapes_dtype",
        "int_value",
    ],
)
def test_bad_inputs_raise_clear_errors(device: str, change, error: type, match: str) -> None:
    inputs = _inputs_for_errors(device)
    change(inputs)
    if device == "cuda" and match.startswith(("S = ", "not the start")):
        pytest.skip("the level table is checked against value only where it lives on the CPU")
    with pytest.raises(error, match=match):
        kernels.ms_deform_attn(
            inputs["value"],
            inputs["spatial_shapes"],
            inputs["level_start_index"],
            inputs["sampling_locations"],
            inputs["attention_weights"],
            implementation="fused",
        )


def test_op_itself_checks_its_inputs() -> None:
    """Called directly (no Python validation), the CPU op still refuses an inconsistent level table."""
    ops.load("cpu", build_if_missing=True)
    inputs = _inputs_for_errors("cpu")
    with pytest.raises(RuntimeError, match="value has S = 15 positions but spatial_shapes sums to 16"):
        torch.ops.dino_kernels.ms_deform_attn(
            inputs["value"][:, :-1],
            inputs["spatial_shapes"],
            inputs["level_start_index"],
            inputs["sampling_locations"],
            inputs["attention_weights"],
        )
    with pytest.raises(RuntimeError, match="sampling_locations must be Float for BFloat16 values"):
        torch.ops.dino_kernels.ms_deform_attn(
            inputs["value"].bfloat16(),
            inputs["spatial_shapes"],
            inputs["level_start_index"],
            inputs["sampling_locations"].bfloat16(),
            inputs["attention_weights"].bfloat16(),
        )


@pytest.mark.cuda
def test_devices_must_match() -> None:
    ops.load("cuda", build_if_missing=True)
    inputs = _inputs_for_errors("cuda")
    with pytest.raises(ValueError, match="sampling_locations is on cpu but value is on cuda"):
        kernels.ms_deform_attn(
            inputs["value"],
            inputs["spatial_shapes"],
            inputs["level_start_index"],
            inputs["sampling_locations"].cpu(),
            inputs["attention_weights"],
        )
