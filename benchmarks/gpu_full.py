"""The `full` preset (37^3, face 37x37 = 1369) trained on a GPU from teacher embeddings computed elsewhere.

GPU machines here cannot load the bundled teacher, so embeddings are exported on the
CPU machine first (real MiniLM vectors through the cache) and carried along:

    python benchmarks/gpu_full.py export --out .gpu/embeddings      # on the CPU machine
    python benchmarks/gpu_full.py train --data .gpu/embeddings --epochs 3 --device cuda

Prints every epoch's metrics (quality beside the in-run baselines, throughput, peak memory).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cnn3d import preset, with_overrides
from cnn3d.decode import build_bank
from cnn3d.train import TrainingData, prepare_data, train


def export(out: Path, config) -> None:
    data = prepare_data(config, torch.device("cpu"))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"train": data.train, "val": data.val, "bank": data.bank.vectors, "difficulty": data.difficulty},
              str(out / "embeddings.safetensors"))
    texts = {"train": data.train_texts, "val": data.val_texts, "bank": data.bank.texts}
    (out / "texts.json").write_text(json.dumps(texts))
    print(f"exported {len(data.train_texts)} train, {len(data.val_texts)} val, {len(data.bank)} bank vectors to {out}")


def load(folder: Path) -> TrainingData:
    tensors = load_file(str(folder / "embeddings.safetensors"))
    texts = json.loads((folder / "texts.json").read_text())
    return TrainingData(
        train_texts=texts["train"], train=tensors["train"], val_texts=texts["val"], val=tensors["val"],
        difficulty=tensors["difficulty"], warmup_texts=[], warmup=tensors["train"][:0],
        bank=build_bank(texts["bank"], tensors["bank"]), cache_metrics={"cache_hit_rate": 1.0},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["export", "train"])
    parser.add_argument("--out", type=Path, default=Path(".gpu/embeddings"))
    parser.add_argument("--data", type=Path, default=Path(".gpu/embeddings"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--set", nargs="*", default=[], help="extra overrides key=value")
    args = parser.parse_args()
    config = with_overrides(preset("full"), {"train.main_epochs": args.epochs, "train.device": args.device,
                                             **dict(s.split("=", 1) for s in args.set)})
    if args.action == "export":
        export(args.out, config)
        return
    data = load(args.data)
    device = torch.device(args.device)
    start = time.perf_counter()

    def show(report):
        m = report.metrics
        keys = ("val_cosine", "baseline_pca_cosine", "baseline_mean_cosine", "val_mse", "decode_top1",
                "throughput_samples_per_s", "cell_steps_per_s", "epoch_seconds", "peak_memory_mb",
                "expert_usage_local", "expert_usage_functional", "expert_usage_distant", "effective_dim")
        print(f"epoch {report.epoch} ({time.perf_counter() - start:.0f} s): "
              + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m), flush=True)

    result = train(config, device=device, data=data, progress=False, callbacks=[show])
    print("precision", config.train.precision, "checkpointing", config.train.gradient_checkpointing,
          "params", result.model.parameter_counts()["total"])


if __name__ == "__main__":
    main()
