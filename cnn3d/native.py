"""The compiled CPU kernels of ``native.c``: built on first use, loaded through ctypes, optional.

``kernels()`` compiles ``native.c`` with the system C compiler (``$CC``, else ``cc``) into
``$CNN3D_KERNEL_DIR`` (default ``~/.cache/cnn3d/kernels``) once per source, compiler and CPU,
and returns the loaded library — or None when there is no compiler, the build fails or
``CNN3D_NATIVE=0``, in which case the fused step runs the same maths as torch ops. Nothing
happens at import. The library links the process's OpenMP runtime, which is torch's own, so
its parallel loops run on torch's intra-op threads at torch's thread count.

Why C and not a torch C++ extension: the file needs no torch headers, so it builds in well
under a second with nothing but ``cc``, and a machine without a compiler loses speed, not
function. ``tests/test_native.py`` compares every kernel with the torch formulation.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno",
         # sums may be reassociated (vector tree reductions; without it a 16-float dot product ends in
         # 16 dependent scalar adds): rounding differs like any BLAS, infinities and NaN are kept
         "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-std=c11")
MAX_LINKS = 256  # as in native.c
MAX_OFFSETS = 256  # as in native.c
MAX_EXPERTS = 16  # as in native.c
MAX_CHANNELS = 512  # as in native.c
WGRAD_OUT_BLOCK, WGRAD_IN_BLOCK = 4, 16  # as in native.c (WG_O, WG_I): the weight gradient's channel blocks
MAX_THREADS = 64  # the most threads one kernel call uses (rows of the link weights' partial sums)

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_SIGNATURES = {
    "cnn3d_link_forward": [_ptr] * 4 + [_i64] * 4 + [_int],
    "cnn3d_link_backward": [_ptr] * 6 + [_i64] * 4 + [_int],
    "cnn3d_update_forward": [_ptr] * 5 + [ctypes.c_float] + [_i64] * 4 + [_int],
    "cnn3d_update_backward": [_ptr] * 7 + [ctypes.c_float] + [_i64] * 4 + [_int],
    "cnn3d_vector_math": [],
    "cnn3d_functional_forward": [_ptr, _i64, _ptr, _i64] + [_ptr] * 6 + [_i64] * 4 + [_int],
    "cnn3d_functional_backward": [_ptr, _i64, _ptr, _i64] + [_ptr] * 9 + [_i64] * 4 + [_int],
    "cnn3d_functional_scratch": [_i64] * 3,
    "cnn3d_stencil_weight_grad": [_ptr] * 3 + [_i64] * 7 + [_int],
}


class Unavailable(Exception):
    """Why the kernels cannot be had here, in words (no compiler, build failed, switched off)."""


def kernel_dir() -> Path:
    """Where builds are kept: ``$CNN3D_KERNEL_DIR``, else ``~/.cache/cnn3d/kernels``."""
    if os.environ.get("CNN3D_KERNEL_DIR"):
        return Path(os.environ["CNN3D_KERNEL_DIR"])
    try:
        return Path.home() / ".cache" / "cnn3d" / "kernels"
    except RuntimeError:  # no HOME and no passwd entry (some containers)
        raise Unavailable("no home folder for the kernel cache; set CNN3D_KERNEL_DIR") from None


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (a cached build must not move CPUs)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(wanted))) or platform.machine()


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc"))


def _loads(path: str) -> bool:
    """Whether a fresh build loads (a library can link and still miss a symbol at load time)."""
    try:
        ctypes.CDLL(path)
        return True
    except OSError:
        return False


def _build(compiler: str) -> Path:
    """Compile ``native.c`` into the kernel folder (atomically: concurrent builders each rename their own)."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, *FLAGS, _cpu_identity()]).encode())
    target = kernel_dir() / f"native-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        # with glibc's vector maths library, else without it (the update and the functional expert
        # then stay in torch ops), else also without -march=native (a compiler that lacks it)
        portable = [flag for flag in FLAGS if flag != "-march=native"]
        for flags, libraries in ((FLAGS, ["-lmvec"]), ([*FLAGS, "-DCNN3D_NO_MVEC"], []),
                                 ([*portable, "-DCNN3D_NO_MVEC"], [])):
            command = [compiler, *flags, str(SOURCE), "-o", tmp, *libraries]  # libraries after the source
            build = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if build.returncode == 0 and _loads(tmp):
                break
        else:
            last = build.stderr.strip().splitlines()[-1:] or ["no message"]
            raise Unavailable(f"{os.path.basename(compiler)} failed to build {SOURCE.name}: {last[0]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None when they cannot be built here (why: ``unavailable_reason()``)."""
    try:
        return _load()
    except Unavailable as exc:
        _reasons.append(str(exc))
    except (OSError, subprocess.SubprocessError) as exc:  # an unwritable cache, a compiler that hangs, ...
        _reasons.append(f"{type(exc).__name__}: {exc}")
    return None


_reasons: list[str] = []
_loaded: list[Path] = []


def unavailable_reason() -> str | None:
    """Why ``kernels()`` returned None, or None when they loaded (or were not asked for yet)."""
    return _reasons[-1] if _reasons else None


def _load() -> ctypes.CDLL:
    if os.environ.get("CNN3D_NATIVE") == "0":
        raise Unavailable("disabled by CNN3D_NATIVE=0")
    compiler = _compiler()
    if compiler is None:
        raise Unavailable(f"no C compiler ({os.environ.get('CC', 'cc')}) on PATH")
    path = _build(compiler)
    try:
        library = ctypes.CDLL(str(path))
    except OSError:  # a cached library that does not load (truncated, or a broken build): build it again, once
        path.unlink(missing_ok=True)
        library = ctypes.CDLL(str(_build(compiler)))
    _loaded[:] = [path]
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    library.cnn3d_functional_scratch.restype = _i64
    return library


def describe() -> str:
    """One line for logs: which step the CPU runs, and why not the kernels when it cannot."""
    if kernels() is None:
        return f"torch ops only ({unavailable_reason()})"
    tanh = "vector" if vector_math() else "scalar, so the update and the functional expert stay in torch ops"
    return f"native kernels ({_loaded[0]}; {tanh} exp/tanh)"


def usable(*tensors: torch.Tensor) -> bool:
    """The kernels apply: float32 CPU tensors, no autocast, and the library builds here."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
        and not torch.is_autocast_enabled("cpu")
        and kernels() is not None
    )


def _threads() -> int:
    return max(1, min(torch.get_num_threads(), MAX_THREADS))


def _p(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def neighbour_tables(dims: tuple[int, int, int], offsets, periodic: bool) -> tuple[torch.Tensor, ...]:
    """``read [N, K]``: the cell each cell reads through each offset (-1 past a zero border); ``readers``: its inverse;
    ``read_t [K, N]``: ``read`` transposed, "none" as N (for the kernels that gather over cells).

    Cells are numbered ``(z * H + y) * W + x``; int32, contiguous.
    """
    d, h, w = dims
    n = d * h * w
    grid = torch.stack(torch.meshgrid(*(torch.arange(s) for s in dims), indexing="ij"), -1).view(n, 1, 3)
    step = torch.tensor(offsets, dtype=torch.int64).view(1, -1, 3)
    size = torch.tensor(dims).view(1, 1, 3)

    def cells(at: torch.Tensor) -> torch.Tensor:
        if periodic:
            at = at % size
        inside = ((at >= 0) & (at < size)).all(-1)
        index = (at[..., 0] * h + at[..., 1]) * w + at[..., 2]
        return torch.where(inside, index, -1).to(torch.int32).contiguous()

    read = cells(grid + step)
    return read, cells(grid - step), torch.where(read < 0, n, read).t().contiguous()


def vector_math() -> bool:
    """The update kernel's tanh runs on vectors (glibc's libmvec); without, torch's tanh is faster."""
    return bool(kernels().cnn3d_vector_math())


def update_forward(rows: torch.Tensor, gates: torch.Tensor, outs: list[torch.Tensor], rate: float):
    """``rows + rate * (tanh(sum_e gates[e] * outs[e]) - rows)`` -> (new rows, the tanh ``t``); all ``[B, N, C]``.

    At most ``MAX_EXPERTS`` experts and ``MAX_CHANNELS`` channels (callers use torch ops past them).
    """
    b, n, c = rows.shape
    new_rows, t = torch.empty_like(rows), torch.empty_like(rows)
    pointers = (_ptr * len(outs))(*[_p(o) for o in outs])
    status = kernels().cnn3d_update_forward(_p(rows), _p(gates), pointers, _p(new_rows), _p(t), rate, len(outs),
                                            b, n, c, _threads())
    if status < 0:
        raise ValueError(f"{len(outs)} experts of {c} channels; the kernel takes at most {MAX_EXPERTS} of "
                         f"{MAX_CHANNELS}")
    return new_rows, t


def update_backward(gates, outs, t, grad_new, rate: float, need_rows: bool, need_gates: bool, need_outs):
    """Gradients of ``update_forward``: (rows, gates, [each expert output]); None where not needed."""
    b, n, c = t.shape
    grad_rows = torch.empty_like(t) if need_rows else None
    grad_gates = torch.empty_like(gates) if need_gates else None
    grad_outs = [torch.empty_like(t) if need else None for need in need_outs]
    kernels().cnn3d_update_backward(_p(gates), (_ptr * len(outs))(*[_p(o) for o in outs]), _p(t), _p(grad_new),
                                    _p(grad_rows), _p(grad_gates), (_ptr * len(outs))(*[_p(g) for g in grad_outs]),
                                    rate, len(outs), b, n, c, _threads())
    return grad_rows, grad_gates, grad_outs


def row_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t [B, D, H, W, X]`` as rows the kernels can read in place: (tensor, floats from one cell to the next).

    A column slice of a contiguous ``[B, D, H, W, P]`` tensor is read where it lies (row stride P);
    anything else is copied to contiguous first.
    """
    stride, shape = t.stride(), t.shape
    if stride[-1] == 1 and all(stride[i] == stride[i + 1] * shape[i + 1] for i in range(t.dim() - 2)):
        return t, stride[-2]
    return t.contiguous(), shape[-1]


def _functional_scratch(value: torch.Tensor, n: int, c: int, k: int) -> tuple[torch.Tensor, int]:
    threads = _threads()
    return value.new_empty(threads, kernels().cnn3d_functional_scratch(n, c, k)), threads


def functional_forward(score, value, bias, read, read_t):
    """The functional expert (see ``native.c``): ``score [B, D, H, W, C+2]`` (gate, dst, src), ``value [B, D, H, W, C]``.

    Returns (out ``[B, N, C]``, attn ``[K, B, N]``).
    """
    (score, score_stride), (value, value_stride) = row_view(score), row_view(value)
    b, c = value.shape[0], value.shape[-1]
    n = value.numel() // (b * c)
    k = read.shape[1]
    out, attn = value.new_empty(b, n, c), value.new_empty(k, b, n)
    scratch, threads = _functional_scratch(value, n, c, k)
    status = kernels().cnn3d_functional_forward(_p(score), score_stride, _p(value), value_stride, _p(bias), _p(read),
                                                _p(read_t), _p(scratch), _p(out), _p(attn), k, b, n, c, threads)
    if status < 0:
        raise ValueError(f"{k} offsets; the kernel takes at most {MAX_OFFSETS}")
    return out, attn


def functional_backward(score, value, attn, grad_out, read, readers, read_t):
    """Gradients of ``functional_forward``: (score ``[B, N, C+2]``, value ``[B, N, C]``, bias ``[K]``)."""
    (score, score_stride), (value, value_stride) = row_view(score), row_view(value)
    k, b, n = attn.shape
    c = value.shape[-1]
    grad_score, grad_value = value.new_empty(b, n, c + 2), value.new_empty(b, n, c)
    partial = torch.zeros(MAX_THREADS, k, dtype=torch.float64)
    scratch, threads = _functional_scratch(value, n, c, k)
    kernels().cnn3d_functional_backward(_p(score), score_stride, _p(value), value_stride, _p(attn), _p(grad_out),
                                        _p(read), _p(readers), _p(read_t), _p(scratch), _p(grad_score),
                                        _p(grad_value), _p(partial), k, b, n, c, threads)
    return grad_score, grad_value, partial.sum(0).to(attn.dtype)


def link_forward(flat: torch.Tensor, weights: torch.Tensor, links: torch.Tensor) -> torch.Tensor:
    """``flat [B, N, C]``, ``weights [L]``, ``links [N, L]`` -> ``[B, N, C]`` (at most ``MAX_LINKS`` links)."""
    b, n, c = flat.shape
    _check_links(links.shape[1])
    out = torch.empty_like(flat)
    kernels().cnn3d_link_forward(_p(flat), _p(weights), _p(out), _p(links), b, n, links.shape[1], c, _threads())
    return out


def _check_links(num_links: int) -> None:
    if num_links > MAX_LINKS:  # native.c's own bound: callers use torch ops past it
        raise ValueError(f"{num_links} links per cell; the kernel takes at most {MAX_LINKS}")


def link_backward(flat, weights, links, grad_out, need_flat: bool, need_weights: bool):
    """Gradients of ``link_forward`` with respect to ``flat`` and ``weights`` (None where not needed)."""
    b, n, c = flat.shape
    num_links = links.shape[1]
    _check_links(num_links)
    grad_flat = torch.empty_like(flat) if need_flat else None
    partial = torch.zeros(MAX_THREADS, num_links, dtype=torch.float64) if need_weights else None
    kernels().cnn3d_link_backward(_p(flat), _p(weights), _p(grad_out), _p(grad_flat), _p(partial), _p(links), b, n,
                                  num_links, c, _threads())
    return grad_flat, None if partial is None else partial.sum(0).to(weights.dtype)


def stencil_weight_grad(grad_out: torch.Tensor, source: torch.Tensor, padding: int) -> torch.Tensor | None:
    """The weight gradient ``[Co, Ci, 3, 3, 3]`` of a 3x3x3 convolution (stride 1) of ``source`` with ``padding``
    (1: zero borders, same size; 0: ``source`` is already padded), from ``grad_out [B, Co, D, H, W]``; both
    channels-last. None when the kernel does not take these channels (Co a multiple of ``WGRAD_OUT_BLOCK``, Ci
    of ``WGRAD_IN_BLOCK``)."""
    b, co, d, h, w = grad_out.shape
    ci = source.shape[1]
    if co % WGRAD_OUT_BLOCK or ci % WGRAD_IN_BLOCK:
        return None
    g = grad_out.permute(0, 2, 3, 4, 1).contiguous()  # [B, D, H, W, Co] rows (a view when channels-last)
    x = source.permute(0, 2, 3, 4, 1).contiguous()
    threads = min(_threads(), b)
    partial = grad_out.new_empty(threads, 27, co, ci)
    used = kernels().cnn3d_stencil_weight_grad(_p(g), _p(x), _p(partial), b, d, h, w, co, ci, padding, threads)
    return partial[:used].sum(0).view(3, 3, 3, co, ci).permute(3, 4, 0, 1, 2)
