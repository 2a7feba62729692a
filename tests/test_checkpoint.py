"""Checkpoints: written as one unit, verified by checksum on load, every damage one ``CheckpointError`` line."""

import copy
import functools
import json
import multiprocessing
import os
import random
import resource
import signal
import subprocess
import time

import pytest
import torch

from cnn3d import preset, with_overrides
from cnn3d.checkpoint import (
    CHECKSUMS,
    CheckpointError,
    check_output_file,
    check_output_folder,
    load_optimizer,
    load_weights,
    open_checkpoint,
    save_checkpoint,
    strict_json,
)
from cnn3d.errors import UserError
from cnn3d.model import build_model

TEACHER_DIM = 24
CONFIG = with_overrides(preset("test"), {"lattice.size": 3, "lattice.steps": 1, "lattice.state_size": 2,
                                         "transform.positional_encoding": False})


@functools.cache
def _built(config):
    model = build_model(config, TEACHER_DIM)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, TEACHER_DIM)).embedding.sum().backward()
    optimizer.step()
    return model, optimizer


def _model_and_optimizer(config=CONFIG):
    """A fresh copy of a model with one optimiser step taken (built once per config: building is the slow part)."""
    return copy.deepcopy(_built(config))


def _stamp(model, optimizer, epoch: int) -> None:
    """Make every float weight and optimiser moment equal ``epoch``: a mixed checkpoint would show two values."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(epoch))
    for state in optimizer.state.values():
        state["exp_avg"].fill_(float(epoch))


def _save(folder, epoch, model=None, optimizer=None):
    if model is None:
        model, optimizer = _model_and_optimizer()
    _stamp(model, optimizer, epoch)
    meta = {"teacher_dim": TEACHER_DIM, "epochs_done": epoch, "step": 10 * epoch, "metrics": {"val_mse": float("nan")}}
    return save_checkpoint(folder, model, CONFIG, meta, optimizer)


def _epoch_of(folder) -> int:
    """Load a checkpoint the way --resume does and prove it is one epoch's state throughout."""
    ckpt = open_checkpoint(folder)
    model, optimizer = _model_and_optimizer(ckpt.config)  # as cnn3d-decode does; --resume compares configs first
    load_weights(ckpt, model)
    assert load_optimizer(ckpt, optimizer)
    epoch = ckpt.epochs_done
    assert ckpt.step == 10 * epoch
    assert all(torch.all(p == epoch) for p in model.parameters())
    assert all(torch.all(s["exp_avg"] == epoch) for s in optimizer.state.values())
    return epoch


def _leftovers(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_round_trip_with_checksums_and_strict_json(tmp_path):
    folder = tmp_path / "ck"
    _save(folder, 1)
    _save(folder, 2)
    assert _epoch_of(folder) == 2
    names = {p.name for p in folder.iterdir()}
    assert names == {"model.safetensors", "optimizer.safetensors", "optimizer.json", "config.json", "meta.json", CHECKSUMS}
    sums = json.loads((folder / CHECKSUMS).read_text())["sha256"]
    assert set(sums) == names - {CHECKSUMS}
    meta = json.loads((folder / "meta.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert meta["metrics"]["val_mse"] is None  # NaN metric stored as null, not as invalid JSON
    assert _leftovers(folder) == []  # no partial or previous folder stays behind
    assert strict_json({"a": float("inf"), "b": [1.0, float("nan")]}) == '{\n  "a": null,\n  "b": [\n    1.0,\n    null\n  ]\n}\n'


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
                          "model.safetensors does not match the checksum"),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors does not match"),
    "flipped byte in weights": (lambda f: _flip_middle_byte(f / "model.safetensors"), "model.safetensors does not match"),
    "flipped byte in optimizer": (lambda f: _flip_middle_byte(f / "optimizer.safetensors"),
                                  "optimizer.safetensors does not match"),
    "bad meta.json": (lambda f: (f / "meta.json").write_text("{not json"), "meta.json does not match"),
    "config.json edited to another size": (
        lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace('"size": 3', '"size": 5')),
        "config.json does not match the checksum recorded when it was saved (damaged or edited)"),
    "missing meta.json": (lambda f: (f / "meta.json").unlink(), "missing meta.json"),
    "garbage checksums.json": (lambda f: (f / CHECKSUMS).write_text("[]"), "checksums.json is damaged"),
    "missing optimizer file": (lambda f: (f / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_one_line_error(tmp_path, damage):
    folder = _save(tmp_path / "ck", 1)
    spoil, message = DAMAGE[damage]
    spoil(folder)
    with pytest.raises(CheckpointError) as err:
        _epoch_of(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


LEGACY_DAMAGE = {  # checkpoints written before checksums: damage is caught when the files are parsed
    "garbage weights": (lambda f: (f / "model.safetensors").write_bytes(os.urandom(300)), "not a readable safetensors"),
    "empty weights": (lambda f: (f / "model.safetensors").write_bytes(b""), "not a readable safetensors"),
    "config.json edited to another size": (
        lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace('"size": 3', '"size": 5')),
        "the weights do not fit the model its config describes (size mismatch"),
    "meta.json a list": (lambda f: (f / "meta.json").write_text("[1]"), "meta.json must be a JSON object"),
    "meta.json without teacher_dim": (lambda f: (f / "meta.json").write_text('{"epochs_done": 1}'), "bad 'teacher_dim'"),
    "config.json out of range": (
        lambda f: (f / "config.json").write_text((f / "config.json").read_text().replace('"size": 3', '"size": 999')),
        "lattice.size=999 is out of range"),
    "optimizer.json garbage": (lambda f: (f / "optimizer.json").write_text('{"x": 1}'), "optimizer state does not fit"),
}


@pytest.mark.parametrize("damage", list(LEGACY_DAMAGE))
def test_damaged_legacy_checkpoint_without_checksums_is_one_line_error(tmp_path, damage):
    folder = _save(tmp_path / "ck", 1)
    (folder / CHECKSUMS).unlink()
    assert _epoch_of(folder) == 1  # an intact legacy checkpoint still loads
    spoil, message = LEGACY_DAMAGE[damage]
    spoil(folder)
    with pytest.raises(CheckpointError) as err:
        _epoch_of(folder)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_writer_killed_between_its_renames_leaves_the_previous_checkpoint(tmp_path):
    folder = _save(tmp_path / "ck", 3)
    os.rename(folder, tmp_path / ".ck.previous")  # the instant between ck -> .ck.previous and partial -> ck
    (tmp_path / ".ck.partial-999999-dead").mkdir()  # and a partial folder of a dead writer
    assert _epoch_of(folder) == 3
    _save(folder, 4)
    assert _epoch_of(folder) == 4 and _leftovers(folder) == []


def _fill_disk_during_save(folder, limit):
    """In a child: lower the file-size limit so the save's writes fail as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        _save(folder, 2)
    except CheckpointError as exc:
        os._exit(3 if "the previous checkpoint is kept" in str(exc) else 4)
    os._exit(0)


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    folder = _save(tmp_path / "ck", 1)
    child = multiprocessing.get_context("fork").Process(target=_fill_disk_during_save, args=(folder, 1000))
    child.start()
    child.join(60)
    assert child.exitcode == 3
    assert _epoch_of(folder) == 1 and _leftovers(folder) == []


def _save_forever(folder, first_epoch, done):
    model, optimizer = _model_and_optimizer()
    epoch = first_epoch
    while True:
        _save(folder, epoch, model, optimizer)
        done.value = epoch  # this epoch's save returned: it is complete on disk
        epoch += 1


@pytest.mark.slow
def test_sigkill_at_random_points_of_saving_never_leaves_a_mixed_checkpoint(tmp_path):
    """24 writers, each SIGKILLed after a random delay; each time the folder loads as one epoch or refuses."""
    folder = tmp_path / "ck"
    _built(CONFIG)  # built before forking, so the children spend their time saving
    rng = random.Random(14)
    ctx = multiprocessing.get_context("fork")
    last, loaded, refused = 0, [], 0
    for _ in range(24):
        # no lock: a child SIGKILLed while holding a Value's lock would leave the parent's read waiting forever
        done = ctx.Value("i", last, lock=False)
        child = ctx.Process(target=_save_forever, args=(folder, last + 1, done))
        child.start()
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        try:
            epoch = _epoch_of(folder)
        except CheckpointError as exc:  # only before any save ever completed
            assert last == 0 and "does not exist" in str(exc)
            refused += 1
            continue
        # the last save the child saw complete, or the one in flight if it had already committed
        assert done.value <= epoch <= done.value + 1, (done.value, epoch)
        loaded.append(epoch)
        last = epoch
    assert len(loaded) >= 20 and loaded == sorted(loaded)
    # each child saves in a loop, so a kill almost always lands inside a save; how many saves a child
    # completes before its kill depends on the machine's speed, so only progress is asserted here
    assert loaded[-1] >= 2, loaded
    _save(folder, last + 1)  # the next save cleans what killed writers left behind
    assert _epoch_of(folder) == last + 1 and _leftovers(folder) == []


# --------------------------------------------------------------------------- up-front checks


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write into, root included (``chattr +i`` where chmod does not bind root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if os.geteuid() == 0:
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    try:
        (folder / "probe").mkdir()
        (folder / "probe").rmdir()
        pytest.skip("cannot make a read-only folder here")
    except OSError:
        pass
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


def test_unwritable_or_foreign_output_is_refused_up_front(tmp_path, read_only_dir):
    with pytest.raises(CheckpointError, match="cannot write checkpoints beside .*choose a writable --out"):
        check_output_folder(read_only_dir / "ck")
    with pytest.raises(UserError, match="cannot write --metrics-json .*ro/m.json"):
        check_output_file(read_only_dir / "m.json")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already holds files and is not a cnn3d checkpoint"):
        check_output_folder(tmp_path / "mine")
    check_output_folder(_save(tmp_path / "ck", 1))  # an earlier checkpoint may be replaced
    check_output_folder(tmp_path / "new" / "deeper")
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path / "mine")
