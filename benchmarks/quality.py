"""Reconstruction quality of a trained student, beside in-run baselines, on seen and never-seen text.

    python benchmarks/quality.py --preset test --epochs 12
    python benchmarks/quality.py --preset wide --epochs 6

Trains from scratch on the built-in corpus (validation split held out by hash), then
evaluates on (a) the validation split and (b) `cnn3d/corpus/heldout.txt`, sentences
in other styles that never enter training. Every figure is printed beside the
baselines computed in the same run: the best linear reconstruction through as many
numbers as the face carries (PCA fitted on the train split) and the mean vector.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cnn3d import metrics as M
from cnn3d import preset, with_overrides
from cnn3d.cache import EmbeddingCache, embed_with_cache
from cnn3d.data import Corpus, heldout_sentences
from cnn3d.decode import bank_texts, build_bank
from cnn3d.teacher import load_teacher
from cnn3d.train import train


@torch.no_grad()
def student_outputs(model, vectors: torch.Tensor, batch: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(vectors[i : i + batch]).embedding.float() for i in range(0, len(vectors), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="test")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = with_overrides(preset(args.preset), {"train.main_epochs": args.epochs,
                                                  **dict(s.split("=", 1) for s in args.set)})
    start = time.perf_counter()
    result = train(config, progress=False)
    seconds = time.perf_counter() - start
    m = result.metrics
    print(f"preset={args.preset} face={config.lattice.face_numbers} epochs={args.epochs} wall={seconds:.0f}s "
          f"({m['throughput_samples_per_s']:.0f} samples/s last epoch)")
    print(f"validation : val_cosine {m['val_cosine']:.4f} | pca {m['baseline_pca_cosine']:.4f} | mean "
          f"{m['baseline_mean_cosine']:.4f} | ratio to pca {m['val_cosine'] / m['baseline_pca_cosine']:.3f} | "
          f"mse {m['val_mse']:.5f} | decode top1 {m['decode_top1']:.3f} top5 {m['decode_top5']:.3f}")

    teacher = load_teacher(config.teacher, torch.device("cpu"))
    cache = EmbeddingCache.from_config(config.data)
    from cnn3d.data import load_corpus

    corpus = load_corpus(config.data)
    train_vectors = embed_with_cache(teacher, corpus.train, cache)
    heldout = heldout_sentences()
    held = embed_with_cache(teacher, heldout, cache)
    out = student_outputs(result.model, held)
    # the trainer's bank rule with the held-out sentences as the validation split
    bank_phrases = bank_texts(Corpus(train=[], validation=heldout, source="held-out"), config.data)
    bank = build_bank(bank_phrases, embed_with_cache(teacher, bank_phrases, cache))
    top1, top5 = bank.accuracy(out, heldout, k=5)
    cosine = F.cosine_similarity(out, held, dim=-1).mean().item()
    pca = M.baseline_pca_cosine(train_vectors, held, config.lattice.face_numbers)
    mean = M.baseline_mean_cosine(train_vectors, held)
    print(f"heldout    : cosine {cosine:.4f} | pca {pca:.4f} | mean {mean:.4f} | ratio to pca {cosine / pca:.3f} | "
          f"mse {F.mse_loss(out, held).item():.5f} | decode top1 {top1:.3f} top5 {top5:.3f} "
          f"(bank {len(bank)} = heldout + built-in; {len(heldout)} never-trained sentences)")
    usage = {k: v for k, v in m.items() if k.startswith("expert_usage_")}
    print("expert usage:", " ".join(f"{k.removeprefix('expert_usage_')}={v:.3f}" for k, v in usage.items()),
          f"| effective_dim {m['effective_dim']:.1f} | cell_specialization {m['cell_specialization']:.3f} "
          f"| rsa_teacher {m['rsa_teacher']:.3f}")


if __name__ == "__main__":
    main()
