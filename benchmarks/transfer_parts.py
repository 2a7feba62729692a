"""Which part of the 8^3 -> 16x16x8 transfer hurts? Full transfer vs cell-only vs face-maps-only vs scratch.

    python benchmarks/transfer_parts.py      (fixed: 200 sentences, batch 16, source 3 epochs, targets 2, 1 thread)

"cell-only" transfers the experts, gate and face I/O and keeps the face maps at their fresh initialisation;
"maps-only" transfers the face maps (resampled) and keeps the cell fresh. Same data, seed and schedule;
each figure beside the target's PCA ceiling.
"""
import tempfile
import time
from pathlib import Path

import torch

from cnn3d import build_model, preset, with_overrides
from cnn3d.checkpoint import save_checkpoint
from cnn3d.train import baselines, prepare_data, train
from cnn3d.transfer import load_student

torch.set_num_threads(1)
common = {"data.max_sentences": 200, "train.num_threads": 1, "train.device": "cpu", "train.batch_size": 16}
source_cfg = with_overrides(preset("test"), {**common, "train.main_epochs": 3})
target_cfg = with_overrides(preset("wide"), {**common, "train.main_epochs": 2})
data = prepare_data(target_cfg, torch.device("cpu"))
ceiling = baselines(data, target_cfg)["baseline_pca_cosine"]
with tempfile.TemporaryDirectory() as tmp:
    src = Path(tmp) / "src"
    print("source", round(train(source_cfg, data=data, out_dir=src, progress=False).metrics["val_cosine"], 4))
    model, cfg, meta = load_student(src)
    fresh = build_model(cfg, data.teacher_dim, seed=cfg.train.seed).state_dict()
    arms = {"scratch": None, "full": src}
    for name, reset in (("cell-only", ("transform.",)), ("maps-only", ("processor.", "face_io."))):
        state = {k: (fresh[k] if k.startswith(reset) else v) for k, v in model.state_dict().items()}
        m = build_model(cfg, data.teacher_dim)
        m.load_state_dict(state)
        folder = Path(tmp) / name
        save_checkpoint(folder, m, cfg, meta)
        arms[name] = folder
    print(f"target ceiling {ceiling:.4f}")
    for name, folder in arms.items():
        cfg_t = target_cfg if folder is None else with_overrides(target_cfg, {"train.init_from": str(folder)})
        t0 = time.perf_counter()
        h = train(cfg_t, data=data, progress=False).history
        print(f"{name:10} " + "  ".join(f"e{int(x['epoch'])}: {x['val_cosine']:.4f} ({x['val_cosine'] / ceiling:.3f})"
                                         for x in h) + f"  {time.perf_counter() - t0:.0f}s", flush=True)
