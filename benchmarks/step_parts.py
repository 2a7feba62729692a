"""Where a training step's time goes: each part of the fused step swapped for a one-pass stand-in, alternated.

    python benchmarks/step_parts.py                      # 8^3, batch 32, 2 threads, 6 rounds
    python benchmarks/step_parts.py --rounds 10 --arms all split

A profiler's per-op table overstates the many small ops of a step (BENCHMARKS.md, issue 13), so this
measures by subtraction instead: the whole training step of the ``test`` preset (forward, backward,
AdamW), then the same step with one part replaced by a stand-in that moves the same tensors once.
The arms run in turn inside one process, ``--rounds`` times, and the medians are printed beside the
``all`` arm of the same run, so that a machine's slow phases fall on every arm alike. Arms:

- ``all``: the step as the library runs it;
- ``split``: the projection as one ``F.linear`` and a split (the code before ``Projection``);
- ``no-stencil``, ``no-functional``, ``no-links``: that expert replaced by a copy of its input;
- ``no-lattice``: every lattice step replaced by a copy (what the transform, readout, loss and
  optimiser cost).

Stand-ins cost a pass or two themselves, so a part's cost here is a slight underestimate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cnn3d import fused, preset, with_overrides
from cnn3d.model import build_model
from cnn3d.train import build_optimizer, student_loss


class _Copy(torch.autograd.Function):
    """A one-pass stand-in: the input copied forward, the gradient passed straight back."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _split_projection(rows, weight, bias, widths):
    """The projection as before ``Projection``: one linear over all parts, then a split (gate experts-first)."""
    parts = F.linear(rows, weight, bias).split(widths, dim=-1)
    return (parts[0].movedim(-1, 0), *parts[1:])


def _stand_ins(model) -> dict[str, dict]:
    """Per arm: (object, attribute) -> replacement, applied for that arm only."""
    processor = model.processor

    def no_lattice(rows, proj_params=None):
        weight = proj_params[0]
        experts = len(processor.experts)
        return _Copy.apply(rows) + 0 * weight.sum(), rows.new_full((*rows.shape[:-1], experts), 1.0 / experts)

    return {
        "all": {},
        "split": {(fused.Projection, "apply"): _split_projection},
        "no-stencil": {(fused.Stencil, "apply"): lambda x, w, b, *_: _Copy.apply(x) + 0 * (w.sum() + b.sum())},
        "no-functional": {(fused.NativeFunctional, "apply"): lambda score, value, bias, tables:
                          _Copy.apply(value.contiguous()) + 0 * (bias.sum() + score.sum())},
        "no-links": {(fused.NativeLinkMix, "apply"): lambda flat, w, links: _Copy.apply(flat) + 0 * w.sum()},
        "no-lattice": {(processor, "step_rows"): no_lattice},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per arm and round")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--arms", nargs="+", default=["all", "split", "no-stencil", "no-functional", "no-links",
                                                      "no-lattice"])
    parser.add_argument("--set", nargs="*", default=[], help="config overrides key=value (the test preset's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = with_overrides(preset("test"), dict(item.split("=", 1) for item in args.set))
    model = build_model(config, 384)
    optimizer = build_optimizer(model, config)
    x = torch.randn(args.batch, 384, generator=torch.Generator().manual_seed(0))
    stand_ins = _stand_ins(model)
    unknown = [arm for arm in args.arms if arm not in stand_ins]
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(stand_ins)}")
    originals = {key: getattr(*key) for arm in stand_ins.values() for key in arm}

    def step():
        loss = student_loss(model, x, config)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {arm: [] for arm in args.arms}
    for _ in range(args.rounds):
        for arm in args.arms:
            for (owner, name), value in originals.items():
                setattr(owner, name, stand_ins[arm].get((owner, name), value))
            for _ in range(2):  # warm-up: the allocator and the kernels' first calls
                step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[arm].append((time.perf_counter() - start) / args.steps * 1e3)
    for (owner, name), value in originals.items():
        setattr(owner, name, value)
    base = statistics.median(times[args.arms[0]])
    print(f"training step of config {dict(item.split('=', 1) for item in args.set) or 'test'}, batch {args.batch}, "
          f"{args.threads} threads, {args.rounds} rounds x {args.steps} steps")
    print(f"{'arm':>14} {'median ms':>10} {'min ms':>8} {'vs ' + args.arms[0]:>10}")
    for arm, values in times.items():
        median = statistics.median(values)
        print(f"{arm:>14} {median:>10.1f} {min(values):>8.1f} {median / base:>10.3f}")


if __name__ == "__main__":
    main()
