"""Decode top-1 against bank size for one checkpoint, beside PCA through the face (the linear ceiling).

    python benchmarks/decoding_bank.py CHECKPOINT --distractors 1000,10000 [--edits 5]

The same numbers as the decoding view of ``cnn3d-analyze CHECKPOINT --distractors ...``
(``cnn3d.analyze.decoding_by_bank_size``) without the rest of the analysis. The bank holds the
validation sentences (the queries) plus n distractors that are never a query: the training split,
then the other built-in corpora, then synthetic sentences. Prints how long the teacher took to
embed the distractors it had not cached, so the cost of larger banks can be extrapolated. ``--edits N``
adds the hard case: a bank of the validation sentences and N one-word edits of each (near neighbours).
"""

from __future__ import annotations

import argparse
import time

import torch

from cnn3d.analyze import decoding_against_edits, decoding_by_bank_size
from cnn3d.checkpoint import load_weights, read_checkpoint_meta
from cnn3d.device import cpu_model
from cnn3d.model import build_model
from cnn3d.train import prepare_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--distractors", default="1000,10000")
    parser.add_argument("--edits", type=int, default=0,
                        help="also decode against N one-word edits of each validation sentence (near neighbours)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    counts = tuple(int(x) for x in args.distractors.split(","))
    config, _ = read_checkpoint_meta(args.checkpoint)
    device = torch.device("cpu")
    data = prepare_data(config, device)
    model = build_model(config, data.teacher_dim)
    load_weights(args.checkpoint, model, device)
    model.eval()
    start = time.perf_counter()
    result = decoding_by_bank_size(model, data, config, device, counts, progress=False)
    seconds = time.perf_counter() - start
    print(f"{cpu_model()}, {args.threads} torch thread(s); {len(data.val_texts)} validation queries; "
          f"face {config.lattice.face_numbers} numbers; decoding incl. embedding distractors: {seconds:.0f} s")
    print(f"{'distractors':>11} {'bank size':>9} {'student top-1':>13} {'PCA top-1':>9} {'mean top-1':>10}")
    for n, size, student, pca, mean in zip(result["distractors"], result["bank_size"], result["student"],
                                           result["pca"], result["mean"]):
        print(f"{int(n):>11} {int(size):>9} {student:>13.3f} {pca:>9.3f} {mean:>10.4f}")
    if args.edits:
        start = time.perf_counter()
        near = decoding_against_edits(model, data, config, device, per_query=args.edits)
        print(f"\nvalidation sentences + {int(near['edits'])} one-word edits of them (bank {int(near['bank_size'])}; "
              f"{time.perf_counter() - start:.0f} s): student top-1 {near['student']:.3f}, PCA top-1 {near['pca']:.3f}, "
              f"mean top-1 {near['mean']:.4f}")


if __name__ == "__main__":
    main()
