"""Checkpoints as plain files: weights in safetensors, config and metrics in JSON. No pickle anywhere.

A checkpoint folder holds:
- ``model.safetensors``: the student's state dict (including the fixed distant links);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW tensors and their structure, for resuming;
- ``config.json``: the config in the dotted vocabulary's nested form;
- ``meta.json``: teacher dimension, epochs done, optimiser steps, the final metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import Config, load_config, save_config
from .errors import UserError

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
META = "meta.json"
CONFIG = "config.json"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    os.replace(tmp, path)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    config: Config,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write a checkpoint folder (files replaced atomically one by one)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(folder / (WEIGHTS + ".tmp")))
    os.replace(folder / (WEIGHTS + ".tmp"), folder / WEIGHTS)
    if optimizer is not None:
        tensors, structure = _optimizer_tensors(optimizer)
        save_file(tensors, str(folder / (OPTIMIZER + ".tmp")))
        os.replace(folder / (OPTIMIZER + ".tmp"), folder / OPTIMIZER)
        _write_json(folder / OPTIMIZER_META, structure)
    save_config(config, folder / CONFIG)
    _write_json(folder / META, meta)
    return folder


def read_checkpoint_meta(folder: str | Path) -> tuple[Config, dict[str, Any]]:
    """Config and meta of a checkpoint; a missing or incomplete folder is a ``UserError``."""
    folder = Path(folder).expanduser()
    missing = [name for name in (WEIGHTS, CONFIG, META) if not (folder / name).is_file()]
    if missing:
        raise UserError(f"{folder} is not a cnn3d checkpoint (missing {', '.join(missing)}); pass a cnn3d-train --out folder")
    meta = json.loads((folder / META).read_text())
    return load_config(folder / CONFIG), meta


def load_weights(folder: str | Path, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Load ``model.safetensors`` into ``model`` (strict: shapes and names must match)."""
    state = load_file(str(Path(folder).expanduser() / WEIGHTS), device=str(device))
    model.load_state_dict(state, strict=True)


def load_optimizer(folder: str | Path, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu") -> bool:
    """Restore optimizer state if the checkpoint has one; returns whether it did."""
    folder = Path(folder).expanduser()
    if not (folder / OPTIMIZER).is_file():
        return False
    tensors = load_file(str(folder / OPTIMIZER), device=str(device))
    structure = json.loads((folder / OPTIMIZER_META).read_text())
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(structure["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pstate in state.values():  # AdamW keeps ``step`` on the CPU
        if torch.is_tensor(pstate.get("step")):
            pstate["step"] = pstate["step"].cpu()
    optimizer.load_state_dict({"state": state, "param_groups": structure["param_groups"]})
    return True
