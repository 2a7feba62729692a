"""Forgetting across a sequence of domains: naive, EWC, replay, freezing and joint training, in one run.

    python benchmarks/continual.py --domains builtin:news,builtin:dialogue --epochs 4

Every variant starts from the same seed and weights and sees the same domains, embedded
once. ``naive`` trains on the domains in sequence with no remedy (the lower bound),
``joint`` trains on all of them at once for as many epochs (the upper bound), and each
remedy changes one ``continual.*`` setting of naive (``progressive``: ``new_expert`` with
the old experts and the gate frozen; ``new_expert``: the added expert alone). ``single:<domain>`` runs train on one
later domain alone, for plasticity: a variant's quality on a domain right after learning
it, over the single-domain run's. Every figure is printed beside each domain's PCA
ceiling and mean-vector null fitted on that domain's training split.

Targets (issue 12): a remedy cuts ``forgetting`` by >= 50% against naive while the last
domain's quality stays within 5% of naive's. Replay's cost is its buffer in bytes, EWC's
the seconds spent estimating the Fisher; both are printed beside their benefit.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cnn3d import preset, with_overrides
from cnn3d.continual import prepare_domains, run_continual
from cnn3d.device import cpu_model
from cnn3d.train import train


def variants(args) -> dict[str, dict[str, object]]:
    """Name -> continual.* overrides on top of naive sequential training."""
    return {
        "naive": {},
        "ewc": {"continual.ewc_lambda": args.ewc_lambda},
        "replay": {"continual.replay_size": args.replay_size, "continual.replay_fraction": args.replay_fraction},
        "freeze": {"continual.freeze": args.freeze},
        "joint": {"continual.joint": True},
        # progressive experts: a copy of the local expert per later stage, old experts and gate frozen
        "progressive": {"continual.new_expert": True, "continual.freeze": args.progressive_freeze},
        "new_expert": {"continual.new_expert": True},
    }



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test")
    parser.add_argument("--domains", default="builtin:news,builtin:dialogue")
    parser.add_argument("--epochs", type=int, default=4, help="main epochs per stage (joint: over the union)")
    parser.add_argument("--ewc-lambda", type=float, default=100.0)
    parser.add_argument("--replay-size", type=int, default=64)
    parser.add_argument("--replay-fraction", type=float, default=0.25)
    parser.add_argument("--freeze", default="transform")
    parser.add_argument("--progressive-freeze", default="gating,local,functional,distant",
                        help="continual.freeze of the progressive variant (the added expert always trains)")
    parser.add_argument("--only", default="", help="comma-separated subset of variants to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default="", help="also write every variant's figures to this file")
    parser.add_argument("--set", nargs="*", default=[], help="extra KEY=VALUE config overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = with_overrides(preset(args.preset), {"train.main_epochs": args.epochs, "data.domains": args.domains,
                                                  "train.device": "cpu", **dict(s.split("=", 1) for s in args.set)})
    device = torch.device("cpu")
    domains = prepare_domains(config, device)
    labels = [d.label for d in domains]
    print(f"cpu: {cpu_model()} ({torch.get_num_threads()} threads) | preset={args.preset} "
          f"face={config.lattice.face_numbers} epochs/stage={args.epochs} domains={args.domains} "
          f"(train/val: {', '.join(f'{d.label} {len(d.data.train_texts)}/{len(d.data.val_texts)}' for d in domains)})")
    chosen = {k: v for k, v in variants(args).items() if not args.only or k in args.only.split(",")}
    results: dict[str, dict[str, float]] = {}
    for name, overrides in chosen.items():
        start = time.perf_counter()
        result = run_continual(with_overrides(config, overrides), device=device, domains=domains)
        results[name] = {**result.metrics, "wall_seconds": time.perf_counter() - start}
        m = results[name]
        print(f"  {name:11} done in {m['wall_seconds']:.0f} s: avg_final {m['avg_final_cosine']:.4f} forgetting "
              f"{m['forgetting']:.4f} last {m['last_domain_cosine']:.4f} | " + ", ".join(
                  f"{k.removeprefix('cl_matrix/')} {v:.4f}" for k, v in m.items() if k.startswith("cl_matrix/")),
              flush=True)
    singles = {}
    for d in domains[1:]:
        start = time.perf_counter()
        single = train(with_overrides(config, {"data.domains": ()}), device=device, progress=False, data=d.data)
        singles[d.label] = single.metrics["val_cosine"]
        print(f"  single:{d.label} done in {time.perf_counter() - start:.0f} s ({single.metrics['val_cosine']:.4f})",
              flush=True)
    report(results, singles, labels)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"results": results, "singles": singles, "labels": labels, "args": vars(args)}, out, indent=2)


def report(results: dict[str, dict[str, float]], singles: dict[str, float], labels: list[str]) -> None:
    """The forgetting table and the issue's targets, each remedy against naive."""
    any_result = next(iter(results.values()))
    print("ceilings (PCA through the face) / nulls (mean vector), per domain: " + ", ".join(
        f"{lab} {any_result[f'cl_pca/{lab}']:.4f} / {any_result[f'cl_mean/{lab}']:.4f}" for lab in labels))
    head = f"{'variant':11} {'avg_final':>9} {'forgetting':>10} {'new_dom':>8} {'last_dom':>8} {'plastic':>7} " + \
        " ".join(f"{'final:' + lab:>14}" for lab in labels) + f" {'fisher_s':>8} {'replay_B':>9} {'wall_s':>7}"
    print(head)
    for name, m in results.items():
        last = "joint" if name == "joint" else str(len(labels))
        plastic = [m[f"cl_matrix/{i + 1}/{lab}"] / singles[lab] for i, lab in enumerate(labels) if lab in singles
                   and f"cl_matrix/{i + 1}/{lab}" in m]
        plasticity = f"{sum(plastic) / len(plastic):7.3f}" if plastic else f"{'-':>7}"
        print(f"{name:11} {m['avg_final_cosine']:9.4f} {m['forgetting']:10.4f} {m['new_domain_cosine']:8.4f} "
              f"{m['last_domain_cosine']:8.4f} {plasticity} "
              + " ".join(f"{m[f'cl_matrix/{last}/{lab}']:14.4f}" for lab in labels)
              + f" {m['cl_fisher_seconds']:8.2f} {m['cl_replay_bytes']:9.0f} {m['wall_seconds']:7.0f}")
    print("plastic = quality on each later domain right after learning it / a single-domain run on it")
    print("single-domain runs (plasticity reference): " + ", ".join(f"{k} {v:.4f}" for k, v in singles.items()))
    if "naive" not in results:
        return
    naive = results["naive"]
    for name, m in results.items():
        if name in ("naive", "joint"):
            continue
        cut = 1 - m["forgetting"] / naive["forgetting"] if naive["forgetting"] > 0 else float("nan")
        last_ratio = m["last_domain_cosine"] / naive["last_domain_cosine"]
        hit = cut >= 0.5 and last_ratio >= 0.95
        print(f"target {name:11}: forgetting cut {cut:+.1%} vs naive (need >= 50%), last domain {last_ratio:.3f} "
              f"of naive (need >= 0.95) -> {'MET' if hit else 'not met'}")


if __name__ == "__main__":
    main()
