"""The trainer end to end on the real teacher (through a warmed cache) and the built-in corpus."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cnn3d import preset, with_overrides
from cnn3d.checkpoint import read_checkpoint_meta
from cnn3d.model import build_model
from cnn3d.train import NonFiniteLoss, epoch_texts, prepare_data, train

TINY = {"lattice.size": 4, "lattice.steps": 4, "lattice.state_size": 8, "data.max_sentences": 160,
        "train.main_epochs": 2, "train.batch_size": 16}
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny(warm_cache):
    config = with_overrides(preset("test"), {**TINY, "data.cache_dir": str(warm_cache)})
    return config, prepare_data(config, torch.device("cpu"))


def test_overfits_a_few_dozen_sentences_end_to_end(warm_cache):
    """Guards the whole path: teacher -> face -> lattice -> back face -> teacher space, trained.

    30 sentences (one batch) are trained on and validated on; about 25 s on 2 quiet cores (0.988 reached).
    """
    config = with_overrides(preset("test"), {
        "data.cache_dir": str(warm_cache), "data.max_sentences": 30, "train.batch_size": 30, "train.main_epochs": 80, "train.lr": 1.5e-2,
        "train.eval_every": 80, "train.weight_decay": 0.0, "loss.diversity": 0.0, "loss.sparsity": 0.0, "loss.load_balance": 0.0,
    })
    data = prepare_data(config, torch.device("cpu"))
    texts, vectors = data.train_texts + data.val_texts, torch.cat([data.train, data.val])
    data = replace(data, train_texts=texts, train=vectors, val_texts=texts, val=vectors,
                   difficulty=torch.zeros(len(texts)))
    result = train(config, data=data, progress=False)
    assert result.metrics["val_cosine"] > 0.98
    assert result.metrics["decode_top1"] == 1.0


def test_same_seed_same_result_and_callbacks_see_every_epoch(tiny):
    config, data = tiny
    seen = []
    first = train(config, data=data, progress=False, callbacks=[lambda r: seen.append((r.epoch, r.phase))])
    second = train(config, data=data, progress=False)
    assert seen == [(1, "main"), (2, "main")]
    assert first.metrics["val_cosine"] == second.metrics["val_cosine"]
    other = train(with_overrides(config, {"train.seed": 1}), data=data, progress=False)
    assert other.metrics["val_cosine"] != first.metrics["val_cosine"]


def test_reports_metrics_beside_baselines(tiny):
    config, data = tiny
    metrics = train(config, data=data, progress=False).metrics
    for name in ("val_mse", "val_cosine", "val_loss", "val_loss_reconstruction", "decode_top1", "decode_top5",
                 "baseline_pca_cosine", "baseline_mean_cosine", "throughput_samples_per_s", "cell_steps_per_s",
                 "epoch_seconds", "peak_memory_mb", "cache_hit_rate", "effective_dim", "mutual_info_front_back",
                 "cell_specialization", "expert_usage_entropy", "expert_usage_local", "embedding_norm_mean",
                 "embedding_norm_std", "activation_sparsity", "rsa_teacher"):
        assert name in metrics, name
    assert 0 < metrics["baseline_mean_cosine"] < metrics["baseline_pca_cosine"] <= 1
    assert metrics["cache_hit_rate"] == 1.0  # the session cache already holds every sentence
    usage = [metrics[f"expert_usage_{e}"] for e in ("local", "functional", "distant")]
    assert sum(usage) == pytest.approx(1.0, abs=1e-4)


def test_callback_can_stop_the_run(tiny):
    config, data = tiny

    class Stop(Exception):
        pass

    def stop(report):
        raise Stop

    with pytest.raises(Stop):
        train(config, data=data, progress=False, callbacks=[stop])


def test_non_finite_loss_stops_with_a_reason(tiny):
    config, data = tiny
    poisoned = data.train.clone()
    poisoned[:] = float("nan")
    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 1/2 batch 1"):
        train(config, data=replace(data, train=poisoned), progress=False)


def test_resume_continues_where_the_checkpoint_left_off(tiny, tmp_path, crash_after):
    config, data = tiny
    three = with_overrides(config, {"train.main_epochs": 3})
    straight = train(three, data=data, progress=False)
    with pytest.raises(crash_after.error):
        train(three, data=data, progress=False, out_dir=tmp_path / "ckpt", callbacks=[crash_after(2)])
    assert read_checkpoint_meta(tmp_path / "ckpt")[1]["epochs_done"] == 2
    epochs = []
    resumed = train(three, data=data, progress=False, resume_from=tmp_path / "ckpt",
                    callbacks=[lambda r: epochs.append(r.epoch)])
    assert epochs == [3]
    assert resumed.metrics["val_cosine"] == pytest.approx(straight.metrics["val_cosine"], abs=1e-5)
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "optimizer.safetensors", "config.json", "meta.json"} <= files
    assert not any(name.endswith((".pt", ".pkl", ".bin")) for name in files)


def test_phases_curriculum_and_frozen_transforms(tiny):
    config, data = tiny
    config = with_overrides(config, {"train.warmup_epochs": 1, "train.fine_tune_epochs": 1, "train.curriculum": True,
                                     "train.curriculum_start_difficulty": 0.5, "train.freeze_transforms": True,
                                     "data.synthetic_sentences": 64})
    data = prepare_data(config, torch.device("cpu"))
    assert len(data.warmup_texts) == 64
    first_main = epoch_texts(data, config, "main", 0)
    assert len(first_main) == pytest.approx(0.5 * len(data.train_texts), abs=1)
    assert data.difficulty[first_main].max() <= data.difficulty.sort().values[len(first_main) - 1]
    phases = []
    result = train(config, data=data, progress=False, callbacks=[lambda r: phases.append(r.phase)])
    assert phases == ["warmup", "main", "main", "fine_tune"]
    fresh = build_model(config, data.teacher_dim)
    for p, q in zip(result.model.transform.parameters(), fresh.transform.parameters()):
        assert torch.equal(p, q)  # frozen: only the experts and gate trained


def test_bf16_autocast_on_cpu_runs(tiny):
    config, data = tiny
    result = train(with_overrides(config, {"train.precision": "bf16", "train.main_epochs": 1}), data=data,
                   progress=False)
    assert 0 < result.metrics["val_cosine"] <= 1


def _cli(name, *args, timeout=300):
    return subprocess.run([str(BIN / name), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_train_and_decode_cli(tmp_path, warm_cache):
    sets = [f"--set={k}={v}" for k, v in {**TINY, "data.cache_dir": str(warm_cache), "train.main_epochs": 1}.items()]
    proc = _cli("cnn3d-train", *sets, "--out", str(tmp_path / "ck"), "--metrics-json", str(tmp_path / "m.json"),
                "--no-progress", "--log-level", "warning")
    assert proc.returncode == 0, proc.stderr
    assert "val_cosine" in proc.stdout and "baselines: pca" in proc.stdout
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["config"]["lattice.size"] == 4 and "val_cosine" in metrics and "baseline_pca_cosine" in metrics
    decoded = _cli("cnn3d-decode", "--checkpoint", str(tmp_path / "ck"), "The river froze early this winter.")
    assert decoded.returncode == 0, decoded.stderr
    assert "The river froze early this winter." in decoded.stdout and "student vs teacher cosine" in decoded.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "lattice.sise=4"], "did you mean lattice.size"),
        (["--set", "transform.dropout=2"], "out of range [0.0, 0.5]"),
        (["--corpus", "/no/such/file.txt"], "does not exist"),
        (["--config", "/no/such.json"], "does not exist"),
        (["--preset", "huge"], "huge"),
        (["--set", "teacher.model=/no/such/model"], "/no/such/model"),
    ],
)
def test_train_cli_bad_input_is_one_line_exit_2(args, message):
    proc = _cli("cnn3d-train", *args, "--set", "train.main_epochs=1", "--log-level", "warning")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


def test_decode_cli_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    proc = _cli("cnn3d-decode", "--checkpoint", str(tmp_path), "hello there")
    assert proc.returncode == 2 and "not a cnn3d checkpoint" in proc.stderr


def test_curriculum_epochs_follow_the_data_rule_and_flush_denormal_is_restored(tiny):
    """One curriculum rule (cnn3d.data.curriculum_indices); train() leaves torch's denormal mode as it found it."""
    from cnn3d.data import curriculum_fraction, curriculum_indices
    from cnn3d.train import _flush_denormal_enabled

    config, data = tiny
    config = with_overrides(config, {"train.curriculum": True, "train.curriculum_start_difficulty": 0.2,
                                     "train.main_epochs": 1, "train.batch_size": 40})
    for epoch, epochs in ((0, 3), (1, 3), (2, 3)):
        fraction = curriculum_fraction(epoch, epochs, 0.2, 1.0)
        with_epochs = with_overrides(config, {"train.main_epochs": epochs})
        assert epoch_texts(data, with_epochs, "main", epoch).tolist() == curriculum_indices(
            data.difficulty.tolist(), fraction, minimum=40)
    torch.set_flush_denormal(False)
    train(config, data=data, progress=False)
    assert not _flush_denormal_enabled()


def test_the_model_takes_training_settings_explicitly(tiny):
    config, data = tiny
    a = build_model(config, data.teacher_dim, seed=3, gradient_checkpointing=True)
    b = build_model(with_overrides(config, {"train.seed": 3}), data.teacher_dim)
    assert a.checkpointing and not b.checkpointing
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_untrained_cube_nulls_are_shared_by_runs_that_differ_only_in_training(tiny, monkeypatch):
    """A dropout sweep's trials share one untrained cube: its nulls are run once, and come out the same."""
    from cnn3d import analysis

    config, data = tiny
    config = with_overrides(config, {"train.main_epochs": 1})
    data = replace(data, nulls={})  # this test's own memo (the fixture's data is shared)
    builds = []
    real_build = analysis.EmergenceNulls.build.__func__
    monkeypatch.setattr(analysis.EmergenceNulls, "build",
                        classmethod(lambda cls, *a, **k: builds.append(1) or real_build(cls, *a, **k)))
    first = train(config, data=data, progress=False).metrics
    dropped = train(with_overrides(config, {"transform.dropout": 0.3}), data=data, progress=False).metrics
    assert len(builds) == 1  # the second run reused the first one's untrained cube
    fresh = train(with_overrides(config, {"transform.dropout": 0.3}), data=replace(data, nulls={}), progress=False).metrics
    assert len(builds) == 2
    nulls = [k for k in first if "_null_" in k or k.endswith("_excess_std")]
    assert nulls and all(dropped[k] == fresh[k] for k in nulls)  # reused nulls give the same figures as fresh ones
    assert dropped["val_cosine"] != first["val_cosine"]  # dropout did change the training
    train(with_overrides(config, {"lattice.steps": 3}), data=data, progress=False)  # another cube: run again
    train(with_overrides(config, {"train.seed": 1}), data=data, progress=False)  # other weights: run again
    assert len(builds) == 4
