"""The compiled kernels of ``cnn3d/native.c`` against the torch formulation of the same maths."""

import ctypes
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from cnn3d import build_model, native, with_overrides
from cnn3d.config import Config
from cnn3d.experts import FunctionalExpert
from cnn3d.fused import GatedUpdate, NativeLinkMix, SparseLinkMix, _functional, _link_csr
from cnn3d.lattice import axial_offsets

needs_kernels = pytest.mark.skipif(native.kernels() is None, reason=f"no kernels here: {native.unavailable_reason()}")

FUNCTIONAL_CASES = {  # dims, radius, boundary, channels (16 + 3: one whole register chunk and a tail)
    "zero": ((4, 5, 6), 2, "zero", 5),
    "periodic": ((4, 5, 6), 2, "periodic", 19),
    "wraps_further_than_lattice": ((2, 3, 3), 3, "periodic", 16),
}


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", FUNCTIONAL_CASES)
def test_functional_kernel_matches_torch_outputs_and_gradients(case, threads):
    """The whole functional expert (attention, mix, gate) in C against the same maths in torch ops."""
    if not native.vector_math():
        pytest.skip("no vector exp here: the functional expert stays in torch ops")
    dims, radius, boundary, channels = FUNCTIONAL_CASES[case]
    expert = FunctionalExpert(channels, radius, boundary, dims)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        expert.offset_bias.copy_(torch.randn(expert.neighbours, generator=generator))
    # the score and value columns as the step has them: slices of one projection
    proj = torch.randn(3, *dims, 2 * channels + 5, generator=generator, requires_grad=True)
    score, value = proj[..., 1:channels + 3], proj[..., channels + 3:2 * channels + 3]
    grad = torch.randn(3, *dims, channels, generator=generator)
    inputs = (proj, expert.offset_bias)
    results = {}
    for use_native in (False, True):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = _functional(expert, value, score, value, use_native)  # (rows: only its shape is read)
            results[use_native] = out, torch.autograd.grad(out, inputs, grad)
        finally:
            torch.set_num_threads(previous)
    (expected_out, expected), (out, got) = results[False], results[True]
    assert torch.allclose(out, expected_out, atol=1e-5)
    for name, a, b in zip(("projection", "offset_bias"), got, expected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), name


@needs_kernels
def test_neighbour_tables_are_inverse_of_each_other():
    offsets = axial_offsets(2)
    for periodic in (False, True):
        read, readers, read_t = native.neighbour_tables((3, 4, 5), offsets, periodic)
        assert torch.equal(read_t.t(), torch.where(read < 0, read.shape[0], read))
        for k in range(len(offsets)):
            for cell in range(read.shape[0]):
                q = int(read[cell, k])
                if q >= 0:
                    assert int(readers[q, k]) == cell
        assert ((read >= 0).sum() == (readers >= 0).sum()) and (periodic == bool((read >= 0).all()))


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_link_mix_matches_sparse_matmul_outputs_and_gradients(threads):
    generator = torch.Generator().manual_seed(1)
    cells, num_links = 60, 5

    class Links(torch.nn.Module):  # what _link_csr reads from an expert
        def __init__(self):
            super().__init__()
            self.register_buffer("links", torch.randint(0, cells, (cells, num_links), generator=generator))

    expert = Links()
    flat = torch.randn(7, cells, 4, generator=generator, requires_grad=True)
    weights = torch.rand(num_links, generator=generator).softmax(0).requires_grad_()
    grad = torch.randn(7, cells, 4, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = NativeLinkMix.apply(flat, weights, expert.links)
        got = torch.autograd.grad(out, (flat, weights), grad)
    finally:
        torch.set_num_threads(previous)
    expected_out = SparseLinkMix.apply(flat, weights, _link_csr(expert, flat.device))
    expected = torch.autograd.grad(expected_out, (flat, weights), grad)
    assert torch.allclose(out, expected_out, atol=1e-5)
    for name, a, b in zip(("flat", "weights"), got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), name


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_gated_update_matches_torch_outputs_and_gradients(threads):
    if not native.vector_math():
        pytest.skip("no vector tanh here: the step keeps torch's update")
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(5, 2, 3, 4, 6, generator=generator, requires_grad=True)
    gates = torch.rand(3, 5, 2, 3, 4, generator=generator)
    gates = (gates * (gates > 0.3)).requires_grad_()  # top-k gating leaves zeros
    outs = [(2 * torch.randn(5, 2, 3, 4, 6, generator=generator)).requires_grad_() for _ in range(3)]
    grad = torch.randn(5, 2, 3, 4, 6, generator=generator)
    inputs = (rows, gates, *outs)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        new = GatedUpdate.apply(rows, gates, 0.3, *outs)
        got = torch.autograd.grad(new, inputs, grad)
    finally:
        torch.set_num_threads(previous)
    expected_new = torch.lerp(rows, torch.tanh(sum(g.unsqueeze(-1) * o for g, o in zip(gates, outs))), 0.3)
    expected = torch.autograd.grad(expected_new, inputs, grad)
    assert torch.allclose(new, expected_new, atol=1e-6)
    for i, (a, b) in enumerate(zip(got, expected)):
        assert torch.allclose(a, b, atol=1e-5), i


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, co, padding", [((3, 16, 4, 5, 6), 16, 1), ((2, 16, 3, 4, 5), 16, 0),
                                                ((4, 32, 2, 3, 2), 32, 1), ((2, 16, 3, 3, 4), 28, 1)])
def test_stencil_weight_gradient_matches_torch(shape, co, padding, threads):
    """``native.stencil_weight_grad`` against torch's convolution backward: zero borders (padding 1) and a source
    already padded (periodic, padding 0), a lattice thinner than the stencil, more channels than one block, and
    28 output channels (on AVX-512 builds: a block of 16, one of 8 and one of the generic 4)."""
    b, c, d, h, w = shape
    generator = torch.Generator().manual_seed(5)
    grow = 2 - 2 * padding
    source = torch.randn(b, d + grow, h + grow, w + grow, c, generator=generator).permute(0, 4, 1, 2, 3)
    grad_out = torch.randn(b, d, h, w, co, generator=generator).permute(0, 4, 1, 2, 3)  # channels-last views
    weight = torch.randn(co, c, 3, 3, 3, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native.stencil_weight_grad(grad_out, source, padding)
    finally:
        torch.set_num_threads(previous)
    expected = torch.ops.aten.convolution_backward(grad_out, source, weight, [co], [1] * 3, [padding] * 3, [1] * 3,
                                                   False, [0] * 3, 1, [False, True, False])[1]
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-5 * (1 + expected.abs().max())
    assert native.stencil_weight_grad(grad_out[:, :6], source[:, :6], padding) is None  # channels it does not take


def test_kernels_build_without_vector_maths(tmp_path):
    """Where glibc has no libmvec the build drops it: the kernels load and say their tanh is scalar."""
    compiler = native._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    library = tmp_path / "scalar.so"
    subprocess.run([compiler, *native.FLAGS, str(native.SOURCE), "-o", str(library), "-DCNN3D_NO_MVEC"], check=True)
    assert ctypes.CDLL(str(library)).cnn3d_vector_math() == 0


@needs_kernels
@pytest.mark.parametrize("overrides", [{}, {"lattice.boundary": "periodic"}, {"lattice.depth": 5, "lattice.height": 3}])
def test_model_with_kernels_matches_torch_ops_in_float32(overrides):
    cfg = with_overrides(Config(), {"lattice.size": 4, "lattice.steps": 4, **overrides})
    model = build_model(cfg, 24).train()
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(2))
    results = {}
    for use_native in (False, True):
        model.processor.native = use_native
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.embedding.pow(2).sum() + out.gates.pow(2).sum() + out.state.sin().sum()).backward()
        results[use_native] = out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    (ref, ref_grads), (new, new_grads) = results[False], results[True]
    assert torch.allclose(new.embedding, ref.embedding, atol=1e-5) and torch.allclose(new.state, ref.state, atol=1e-5)
    assert set(new_grads) == set(ref_grads)
    for name, grad in ref_grads.items():
        # float32 summation order differs; a wrong gradient is off by about its own size
        assert (new_grads[name] - grad).abs().max() <= 1e-4 * (1 + grad.abs().max()), name


@needs_kernels
def test_links_out_of_range_are_an_error_not_a_crash():
    cfg = with_overrides(Config(), {"lattice.size": 4, "lattice.steps": 2})
    model = build_model(cfg, 24)
    with torch.no_grad():
        model.processor.experts["distant"].links[0, 0] = 4**3  # one past the last cell
    with pytest.raises(ValueError, match="outside the lattice"):
        model(torch.randn(2, 24))


def _child(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_without_a_compiler_the_step_runs_in_torch_ops(tmp_path):
    result = _child("""
        import torch
        from cnn3d import build_model, native, with_overrides
        from cnn3d.config import Config
        model = build_model(with_overrides(Config(), {"lattice.size": 4, "lattice.steps": 2}), 24)
        model(torch.randn(2, 24)).embedding.sum().backward()
        print(native.kernels() is None, native.unavailable_reason())
        print(native.describe())
    """, {"CC": str(tmp_path / "no-such-compiler"), "CNN3D_KERNEL_DIR": str(tmp_path / "kernels")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("True no C compiler"), result.stdout
    assert result.stdout.splitlines()[1].startswith("torch ops only (no C compiler")
    assert not (tmp_path / "kernels").exists()


@needs_kernels
def test_processes_building_at_once_all_load_one_library(tmp_path):
    """Four processes race to build into an empty folder: each renames its own build, all load, one file stays."""
    code = "from cnn3d import native; assert native.kernels() is not None, native.unavailable_reason()"
    env = {**os.environ, "CNN3D_KERNEL_DIR": str(tmp_path)}
    children = [subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    for child in children:
        assert child.wait(timeout=300) == 0, child.stderr.read()
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_disabled_by_environment(tmp_path):
    result = _child("from cnn3d import native; print(native.kernels() is None, native.unavailable_reason())",
                    {"CNN3D_NATIVE": "0", "CNN3D_KERNEL_DIR": str(tmp_path)})
    assert result.returncode == 0 and result.stdout.strip() == "True disabled by CNN3D_NATIVE=0"


def test_a_failed_build_is_a_reason_not_a_crash(tmp_path):
    """A compiler that rejects the source leaves the step in torch ops, with the compiler's last line as the reason."""
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\n[ \"$1\" = --version ] && { echo fake 1.0; exit 0; }\necho 'native.c:1: error: no' >&2\nexit 1\n")
    compiler.chmod(0o755)
    result = _child("from cnn3d import native; print(native.kernels() is None); print(native.describe())",
                    {"CC": str(compiler), "CNN3D_KERNEL_DIR": str(tmp_path / "kernels")})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["True", "torch ops only (cc failed to build native.c: native.c:1: error: no)"]
    assert list((tmp_path / "kernels").iterdir()) == []  # no half-written library left behind


@needs_kernels
def test_a_cached_library_that_does_not_load_is_built_again(tmp_path):
    """A truncated file under the cache's name (a disk that filled up, say) is replaced, not trusted."""
    env = {"CNN3D_KERNEL_DIR": str(tmp_path)}
    first = _child("from cnn3d import native; native.kernels(); print(native._loaded[0])", env)
    library = tmp_path / first.stdout.strip().rsplit("/", 1)[-1]
    library.write_bytes(library.read_bytes()[:100])
    again = _child("from cnn3d import native; print(native.describe())", env)
    assert again.returncode == 0 and again.stdout.startswith("native kernels"), again.stdout + again.stderr
    assert library.stat().st_size > 100


def test_kernels_load_wherever_a_compiler_exists():
    """Guards the skips above: where cc exists (as in CI), the kernels must build and load, not quietly step aside."""
    if native._compiler() is None or os.environ.get("CNN3D_NATIVE") == "0":
        pytest.skip("no C compiler here, or the kernels are switched off")
    assert native.kernels() is not None, native.unavailable_reason()
    if sys.platform == "linux" and platform.machine() == "x86_64" and _glibc() >= (2, 35):
        assert native.vector_math(), "glibc has libmvec here: the vector exp/tanh should be in use"


def _glibc() -> tuple[int, ...]:
    name, version = platform.libc_ver()
    return tuple(int(v) for v in version.split(".")[:2]) if name == "glibc" and version else (0,)


def test_without_a_home_folder_the_reason_says_where_to_build(tmp_path):
    code = ("import os, pathlib\n"
            "def no_home(): raise RuntimeError('Could not determine home directory.')\n"
            "pathlib.Path.home = staticmethod(no_home)\n"
            "from cnn3d import native\n"
            "print(native.describe())")
    env = {k: v for k, v in os.environ.items() if k != "CNN3D_KERNEL_DIR"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch ops only (no home folder for the kernel cache; set CNN3D_KERNEL_DIR)"
