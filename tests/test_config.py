import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from cnn3d.config import (
    Config,
    ConfigError,
    field_spec,
    field_specs,
    flatten,
    load_config,
    parse_assignments,
    preset,
    save_config,
    unflatten,
    with_overrides,
)


def test_with_overrides_returns_new_validated_config_and_coerces_strings():
    base = Config()
    new = with_overrides(base, {"transform.dropout": "0.2", "lattice.size": "12", "transform.layer_norm": "false"})
    assert new.transform.dropout == 0.2 and isinstance(new.transform.dropout, float)
    assert new.lattice.size == 12 and isinstance(new.lattice.size, int)
    assert new.transform.layer_norm is False
    assert base.lattice.size == 8 and base.transform.dropout == 0.0  # the original is untouched


def test_tuple_fields_coerce_from_comma_separated_strings():
    cfg = with_overrides(Config(), {"moe.experts": "local,distant", "transform.hidden_sizes": "256, 512"})
    assert cfg.moe.experts == ("local", "distant")
    assert cfg.transform.hidden_sizes == (256, 512)


def test_unknown_key_suggests_closest_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'transform\.dropuot'.*transform\.dropout"):
        with_overrides(Config(), {"transform.dropuot": 0.1})
    with pytest.raises(ConfigError, match=r"did you mean.*transform\.dropout"):
        with_overrides(Config(), {"dropout": 0.1})


def test_out_of_range_value_names_field_value_and_range():
    with pytest.raises(ConfigError, match=r"transform\.dropout=0\.9 is out of range \[0\.0, 0\.5\]"):
        with_overrides(Config(), {"transform.dropout": 0.9})
    with pytest.raises(ConfigError, match=r"transform\.kind='conv' is not one of linear, hierarchical"):
        with_overrides(Config(), {"transform.kind": "conv"})
    with pytest.raises(ConfigError, match=r"lattice\.size='big' is not an integer"):
        with_overrides(Config(), {"lattice.size": "big"})
    with pytest.raises(ConfigError, match=r"train\.gradient_checkpointing='maybe' is not true or false"):
        with_overrides(Config(), {"train.gradient_checkpointing": "maybe"})


def test_cross_field_rules_are_checked():
    with pytest.raises(ConfigError, match="moe.experts"):
        with_overrides(Config(), {"moe.experts": "local,teleport"})
    with pytest.raises(ConfigError, match="top_k"):
        with_overrides(Config(), {"moe.experts": "local", "moe.gating": "topk", "moe.top_k": 2})
    with pytest.raises(ConfigError, match="curriculum_end_difficulty"):
        with_overrides(Config(), {"train.curriculum_start_difficulty": 0.8, "train.curriculum_end_difficulty": 0.5})


def test_flatten_and_unflatten_round_trip_exactly():
    cfg = with_overrides(preset("full"), {"moe.experts": "functional,distant", "train.lr": 1e-4})
    flat = flatten(cfg)
    assert set(flat) == set(field_specs())
    assert unflatten(flat) == cfg
    assert flatten(unflatten(flat)) == flat


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_save_and_load_round_trip(tmp_path, suffix):
    cfg = with_overrides(preset("wide"), {"transform.hidden_sizes": "64,128", "loss.triplet": 0.5})
    path = save_config(cfg, tmp_path / f"config{suffix}")
    assert load_config(path) == cfg


def test_load_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "bad.json" in str(err.value) and "\n" not in str(err.value)
    bad.write_text(json.dumps({"lattice": {"sise": 4}}))
    with pytest.raises(ConfigError, match="lattice.size"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")


def test_presets():
    test, full, wide = preset("test"), preset("full"), preset("wide")
    assert test.lattice.dims == (8, 8, 8) and test.lattice.face_numbers == 64
    assert full.lattice.dims == (37, 37, 37) and full.lattice.face_numbers == 1369
    assert full.train.gradient_checkpointing
    assert wide.lattice.dims == (8, 16, 16) and wide.lattice.face_numbers == 256
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of test"):
        preset("huge")


def test_non_cubic_dims():
    cfg = with_overrides(Config(), {"lattice.size": 6, "lattice.depth": 10, "lattice.width": 4})
    assert cfg.lattice.dims == (10, 6, 4)
    assert cfg.lattice.num_cells == 240


def test_every_field_has_doc_and_tunable_numbers_have_ranges():
    for key, spec in field_specs().items():
        assert spec.doc, key
        if spec.kind in ("int", "float") and spec.tune:
            assert spec.low is not None and spec.high is not None, key
    assert field_spec("train.lr").log is True
    assert field_spec("transform.kind").choices == ("linear", "hierarchical", "attention", "autoencoder")


def test_config_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().lattice.size = 3  # type: ignore[misc]


def test_parse_assignments():
    assert parse_assignments(["a.b=1", "c.d = x=y"]) == {"a.b": "1", "c.d": "x=y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_assignments(["novalue"])


def test_import_has_no_side_effects():
    code = (
        "import logging, torch; before = (list(logging.getLogger().handlers), torch.get_num_threads());"
        "import cnn3d, cnn3d.model, cnn3d.config;"
        "assert (list(logging.getLogger().handlers), torch.get_num_threads()) == before;"
        "assert logging.getLogger().level == logging.WARNING"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert logging.getLogger("cnn3d").handlers == []


SEED_PLAN_FIELDS = {
    "teacher_model": "teacher.model", "teacher_embedding_dim": "teacher.embedding_dim",
    "cube_surface_dim": "lattice.size", "transformation_type": "transform.kind",
    "use_layer_norm": "transform.layer_norm", "dropout_rate": "transform.dropout", "cache_embeddings": "data.cache",
    "cache_dir": "data.cache_dir", "max_cache_size_gb": "data.max_cache_size_gb",
    "warmup_epochs": "train.warmup_epochs", "main_epochs": "train.main_epochs",
    "fine_tune_epochs": "train.fine_tune_epochs", "reconstruction_loss_weight": "loss.reconstruction",
    "similarity_loss_weight": "loss.cosine", "diversity_loss_weight": "loss.diversity",
    "emergence_loss_weight": "loss.sparsity", "use_curriculum_learning": "train.curriculum",
    "curriculum_start_difficulty": "train.curriculum_start_difficulty",
    "curriculum_end_difficulty": "train.curriculum_end_difficulty", "embedding_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps", "test_lattice_dim": "lattice.size",
    "test_dataset_size": "data.max_sentences", "test_validation_split": "data.validation_fraction",
}


def test_every_seed_plan_setting_has_a_home():
    specs = field_specs()
    for plan_name, key in SEED_PLAN_FIELDS.items():
        assert key in specs, plan_name
    # cube_embedding_dim is derived from the face, never stored twice
    assert preset("full").lattice.face_numbers == 37 * 37


# --------------------------------------------------------------------------- NaN and infinities (issue 14)


FLOAT_KEYS = [key for key, spec in field_specs().items() if spec.type is float]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_every_float_key_rejects_non_finite_values_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}=.* is not a finite number"):
        with_overrides(Config(), {key: value})


def test_nan_in_a_config_file_is_rejected_and_saved_configs_are_strict_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"loss": {"reconstruction": NaN}}')
    with pytest.raises(ConfigError, match=r"loss\.reconstruction=nan is not a finite number"):
        load_config(path)
    (tmp_path / "c.yaml").write_text("moe:\n  gate_temperature: .nan\n")
    with pytest.raises(ConfigError, match=r"moe\.gate_temperature=nan"):
        load_config(tmp_path / "c.yaml")
    saved = save_config(Config(), tmp_path / "ok.json").read_text()
    json.loads(saved, parse_constant=lambda name: pytest.fail(f"bare {name} in config.json"))
    with pytest.raises(ConfigError, match="is not an integer"):
        with_overrides(Config(), {"lattice.size": float("nan")})


def test_periodic_functional_radius_beyond_the_smallest_side_is_rejected():
    ok = with_overrides(Config(), {"lattice.size": 3, "lattice.boundary": "periodic", "moe.functional_radius": 3})
    assert ok.moe.functional_radius == 3
    with pytest.raises(ConfigError, match=r"moe\.functional_radius=4 exceeds the smallest lattice side 3"):
        with_overrides(Config(), {"lattice.size": 3, "lattice.boundary": "periodic", "moe.functional_radius": 4})
    with pytest.raises(ConfigError, match="smallest lattice side 2"):
        with_overrides(Config(), {"lattice.size": 6, "lattice.depth": 2, "lattice.boundary": "periodic",
                                  "moe.functional_radius": 3})
    # without the functional expert, or with zero padding, the radius is not used to wrap
    with_overrides(Config(), {"lattice.size": 2, "lattice.boundary": "periodic", "moe.experts": "local,distant"})
    with_overrides(Config(), {"lattice.size": 2, "moe.functional_radius": 5})
