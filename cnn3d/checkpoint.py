"""Checkpoints as plain files: weights in safetensors, config and metrics in JSON. No pickle anywhere.

A checkpoint folder holds:
- ``model.safetensors``: the student's state dict (including the fixed distant links);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW tensors and their structure, for resuming;
- ``config.json``: the config in the dotted vocabulary's nested form;
- ``meta.json``: teacher dimension, epochs done, optimiser steps, the final metrics;
- ``state.safetensors`` (optional): other tensors a resume needs (a continual run's EWC and replay state);
- ``checksums.json``: the sha256 of every other file, checked on every load.

Written as one unit: ``save_checkpoint`` fills a temporary folder beside the target
(``.<name>.partial-<pid>-<random>``), fsyncs every file and the folder, then swaps it in with
renames: ``<name>`` -> ``.<name>.previous``, partial -> ``<name>``, and deletes the previous one.
A process killed at any point leaves either the old or the new complete checkpoint: if it dies
between the two renames only ``.<name>.previous`` exists, and readers fall back to it. A flipped
byte, a truncated file or an edited ``config.json`` fails the checksum check with one line.
Checkpoints written before checksums existed still load (with a warning), without that check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .config import Config, ConfigError, load_config, to_dict
from .errors import UserError

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "check_output_file",
    "check_output_folder",
    "load_optimizer",
    "load_state",
    "load_weights",
    "open_checkpoint",
    "read_checkpoint_meta",
    "save_checkpoint",
    "strict_json",
]

logger = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
META = "meta.json"
CONFIG = "config.json"
CHECKSUMS = "checksums.json"
STATE = "state.safetensors"
REQUIRED = (WEIGHTS, CONFIG, META)


class CheckpointError(UserError):
    """A checkpoint folder is missing, damaged or does not fit; the message names the folder and the file."""


# --------------------------------------------------------------------------- JSON and files


def strict_json(data: Any) -> str:
    """Indented strict JSON: NaN and infinities become ``null`` (bare ``NaN`` is not JSON)."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # torch/numpy scalars and arrays
            return clean(value.tolist())
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory; the files are synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------- where things go


def _target(folder: str | Path) -> Path:
    path = Path(folder).expanduser()
    return path.resolve() if path.is_symlink() else path


def _previous(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.previous"


def _is_checkpoint(folder: Path) -> bool:
    return (folder / META).is_file() or (folder / WEIGHTS).is_file()


def check_output_folder(folder: str | Path) -> None:
    """Fail now, with one line, if checkpoints cannot be written to ``folder`` (before any training time is spent).

    ``folder`` may be new, empty, or an earlier checkpoint (it is replaced); a folder holding other files is
    refused so that nothing of the user's is moved or deleted.
    """
    target = _target(folder)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"--out {target} is a file; give a folder for the checkpoint")
    if target.is_dir() and any(target.iterdir()) and not _is_checkpoint(target):
        raise CheckpointError(
            f"--out {target} already holds files and is not a cnn3d checkpoint; give a new or empty folder"
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=target.parent)
        os.rmdir(probe)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoints beside {target} ({exc.strerror or _first_line(exc)}); "
            "choose a writable --out folder"
        ) from None


def check_output_file(path: str | Path, flag: str = "--metrics-json") -> None:
    """Fail now, with one line, if ``path`` cannot be written (its folder is created if needed)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UserError(f"{flag} {target} is a folder; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=f".{target.name}.probe-", dir=target.parent):
            pass
        if target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise UserError(f"cannot write {flag} {target} ({exc.strerror or _first_line(exc)}); "
                        "choose a writable path") from None


def write_json_file(path: str | Path, data: Any) -> None:
    """Write strict JSON to ``path`` through a temporary file and a rename (never half a file)."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    try:
        _write_synced(tmp, strict_json(data).encode())
        os.replace(tmp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"could not write {target} ({exc.strerror or _first_line(exc)})") from None


# --------------------------------------------------------------------------- saving


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


def _checkpoint_files(model, config, meta, optimizer, state=None) -> dict[str, bytes]:
    """Every file of the checkpoint as bytes, ``checksums.json`` last."""
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files = {WEIGHTS: save_safetensors(weights)}
    if optimizer is not None:
        tensors, structure = _optimizer_tensors(optimizer)
        files[OPTIMIZER] = save_safetensors(tensors)
        files[OPTIMIZER_META] = strict_json(structure).encode()
    if state is not None:
        files[STATE] = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
    files[CONFIG] = (json.dumps(to_dict(config), indent=2, allow_nan=False) + "\n").encode()
    files[META] = strict_json(meta).encode()
    sums = {"format": 1, "sha256": {name: _sha256(data) for name, data in files.items()}}
    files[CHECKSUMS] = strict_json(sums).encode()
    return files


def _remove_dead_partials(target: Path) -> None:
    """Delete partial folders left by killed savers (their pid no longer runs)."""
    for partial in target.parent.glob(f".{target.name}.partial-*"):
        pid = partial.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # still running: another saver's folder
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    config: Config,
    meta: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a checkpoint folder as one unit (see the module docstring); returns the folder.

    ``state``: further named tensors a resume needs, kept in ``state.safetensors``.

    A write error (full disk, lost permission) raises ``CheckpointError`` and leaves the previous
    complete checkpoint in place.
    """
    target = _target(folder)
    files = _checkpoint_files(model, config, meta, optimizer, state)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(target)
        partial.mkdir()
        for name, data in files.items():
            _write_synced(partial / name, data)
        _fsync_dir(partial)
        _swap_in(partial, target)
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        kept = "the previous checkpoint is kept" if _is_checkpoint(target) else "no checkpoint was written"
        raise CheckpointError(
            f"could not write checkpoint {target} ({exc.strerror or _first_line(exc)}); {kept}"
        ) from None
    return target


def _swap_in(partial: Path, target: Path) -> None:
    """Replace ``target`` by the complete ``partial`` folder; a complete checkpoint exists at every instant."""
    previous = _previous(target)
    if target.exists():
        if previous.exists():  # left by a saver killed after its swap: target is the newer complete one
            shutil.rmtree(previous)
        os.rename(target, previous)
    # else: a saver killed between its two renames left only ``previous``; keep it until we are in place
    os.rename(partial, target)
    _fsync_dir(target.parent)
    shutil.rmtree(previous, ignore_errors=True)


# --------------------------------------------------------------------------- loading


@dataclass
class Checkpoint:
    """A verified checkpoint folder: its config, meta and the bytes of its files (checksums already checked)."""

    folder: Path
    config: Config
    meta: dict[str, Any]
    files: dict[str, bytes]

    @property
    def teacher_dim(self) -> int:
        return int(self.meta["teacher_dim"])

    @property
    def epochs_done(self) -> int:
        return int(self.meta.get("epochs_done", 0))

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def _resolve(folder: str | Path) -> Path:
    target = _target(folder)
    previous = _previous(target)
    if not target.exists() and previous.is_dir():
        logger.warning("checkpoint %s was being replaced when its writer stopped; using the previous one", target)
        return previous
    return target


def _read_files(folder: Path) -> dict[str, bytes]:
    """Bytes of every checkpoint file present; checksums verified when ``checksums.json`` exists."""
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist; pass a folder written by cnn3d-train --out")
    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder} is not a cnn3d checkpoint (missing {', '.join(missing)}); pass a cnn3d-train --out folder"
        )
    names = [n for n in (WEIGHTS, OPTIMIZER, OPTIMIZER_META, CONFIG, META, CHECKSUMS, STATE) if (folder / n).is_file()]
    try:
        files = {name: (folder / name).read_bytes() for name in names}
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {folder} ({exc.strerror or _first_line(exc)})") from None
    if CHECKSUMS not in files:
        logger.info("checkpoint %s has no %s (written by an older cnn3d); its files are not verified",
                       folder, CHECKSUMS)
        return files
    _verify(folder, files)
    return files


def _verify(folder: Path, files: dict[str, bytes]) -> None:
    try:
        recorded = json.loads(files[CHECKSUMS])["sha256"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {folder}: {CHECKSUMS} is damaged; use another checkpoint or retrain") from None
    for name in REQUIRED:
        if name not in recorded:
            raise CheckpointError(f"checkpoint {folder}: {CHECKSUMS} lists no checksum for {name}; it is damaged")
    for name, digest in recorded.items():
        if name not in files:
            raise CheckpointError(f"checkpoint {folder}: {name} is missing; use another checkpoint or retrain")
        if _sha256(files[name]) != digest:
            raise CheckpointError(
                f"checkpoint {folder}: {name} does not match the checksum recorded when it was saved "
                "(damaged or edited); use another checkpoint or retrain"
            )


def _parse_meta(folder: Path, raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {folder}: {META} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {folder}: {META} must be a JSON object, got {type(meta).__name__}")
    for key in ("teacher_dim", "epochs_done", "step"):
        value = meta.get(key, 0 if key != "teacher_dim" else None)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if key == "teacher_dim" else 0):
            raise CheckpointError(f"checkpoint {folder}: {META} has a bad {key!r} ({value!r}); it is damaged")
    return meta


def open_checkpoint(folder: str | Path) -> Checkpoint:
    """Read and verify a checkpoint folder; anything missing or damaged is a one-line ``CheckpointError``."""
    path = _resolve(folder)
    files = _read_files(path)
    meta = _parse_meta(path, files[META])
    try:
        config = load_config(path / CONFIG) if CHECKSUMS not in files else _config_from_bytes(path, files[CONFIG])
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return Checkpoint(path, config, meta, files)


def _config_from_bytes(folder: Path, raw: bytes) -> Config:
    from .config import from_dict

    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"{CONFIG} is not valid JSON ({_first_line(exc)})") from None
    return from_dict(data)


def read_checkpoint_meta(folder: str | Path) -> tuple[Config, dict[str, Any]]:
    """Config and meta of a verified checkpoint; a missing, incomplete or damaged folder is a ``UserError``."""
    ckpt = open_checkpoint(folder)
    return ckpt.config, ckpt.meta


def _as_checkpoint(source: str | Path | Checkpoint) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else open_checkpoint(source)


def _tensors(ckpt: Checkpoint, name: str, device: torch.device | str) -> dict[str, torch.Tensor]:
    try:
        tensors = load_safetensors(ckpt.files[name])
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for any damage
        raise CheckpointError(
            f"checkpoint {ckpt.folder}: {name} is not a readable safetensors file ({_first_line(exc)})"
        ) from None
    return {k: v.to(device) for k, v in tensors.items()}


def load_weights(source: str | Path | Checkpoint, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
    """Load ``model.safetensors`` into ``model`` (strict: names and shapes must match, else ``CheckpointError``)."""
    ckpt = _as_checkpoint(source)
    state = _tensors(ckpt, WEIGHTS, device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), _first_line(exc))
        raise CheckpointError(
            f"checkpoint {ckpt.folder}: the weights do not fit the model its config describes ({detail[:200]})"
        ) from None


def load_optimizer(source: str | Path | Checkpoint, optimizer: torch.optim.Optimizer,
                   device: torch.device | str = "cpu") -> bool:
    """Restore optimizer state if the checkpoint has one; returns whether it did."""
    ckpt = _as_checkpoint(source)
    if OPTIMIZER not in ckpt.files:
        return False
    tensors = _tensors(ckpt, OPTIMIZER, device)
    try:
        structure = json.loads(ckpt.files[OPTIMIZER_META])
        state: dict[int, dict[str, Any]] = {}
        for key, value in list(tensors.items()) + list(structure["scalars"].items()):
            pid, name = key.split(".", 1)
            state.setdefault(int(pid), {})[name] = value
        for pstate in state.values():  # AdamW keeps ``step`` on the CPU
            if torch.is_tensor(pstate.get("step")):
                pstate["step"] = pstate["step"].cpu()
        optimizer.load_state_dict({"state": state, "param_groups": structure["param_groups"]})
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt.folder}: the optimizer state does not fit this run ({_first_line(exc)[:200]})"
        ) from None
    return True


def load_state(source: str | Path | Checkpoint) -> dict[str, torch.Tensor]:
    """The tensors of ``state.safetensors`` (on the CPU); empty if the checkpoint has none."""
    ckpt = _as_checkpoint(source)
    return _tensors(ckpt, STATE, "cpu") if STATE in ckpt.files else {}
