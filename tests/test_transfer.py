"""Transfer between lattice sizes, growing during training, and the --init-from command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cnn3d import build_model, preset, with_overrides
from cnn3d.checkpoint import read_checkpoint_meta
from cnn3d.config import ConfigError
from cnn3d.errors import UserError
from cnn3d.train import prepare_data, train
from cnn3d.transfer import (
    REFIT_RIDGE,
    TransferError,
    _interp_matrix,
    load_student,
    refit_readout,
    resample_face,
    stage_config,
    transfer_weights,
)

SMALL = {"lattice.size": 4, "lattice.steps": 4, "lattice.state_size": 8}
TINY = {**SMALL, "data.max_sentences": 64, "train.main_epochs": 1, "train.batch_size": 16}
BIN = Path(sys.executable).parent


def _student(**overrides):
    config = with_overrides(preset("test"), {**SMALL, **overrides})
    return build_model(config, 384).eval(), config


def test_cell_weights_copy_exactly_and_face_maps_are_resampled():
    source, _ = _student(**{"train.seed": 1})
    target, _ = _student(**{"lattice.size": 6, "lattice.depth": 5})
    table = transfer_weights(source, target, face_map="stretch")
    src, dst = source.state_dict(), target.state_dict()
    cell = [k for k in dst if k.startswith(("processor.", "face_io.")) and not k.endswith(".links")]
    assert cell and all(torch.equal(src[k], dst[k]) for k in cell)
    resampled = {entry.split(" ")[0] for entry in table.resampled}
    assert {"transform.encode.weight", "transform.decode.weight", "transform.position"} <= resampled
    assert dst["transform.encode.weight"].shape == (36, 384)
    assert table.fresh == [] and table.dropped == []
    assert any(e.startswith("processor.experts.distant.links") for e in table.redrawn)
    # the distant links are the target's own, drawn by the same rule at its size
    assert torch.equal(dst["processor.experts.distant.links"], _student(**{"lattice.size": 6, "lattice.depth": 5})[0]
                       .state_dict()["processor.experts.distant.links"])


def test_read_side_resampling_inverts_the_interpolation_when_growing():
    """decode' . A = decode: a face the lattice merely carries decodes to the same vector after growing."""
    weights = torch.randn(7, 2 * 4 * 4)  # [T, F*H*W], reads a 2x4x4 face
    face = torch.randn(3, 2 * 4 * 4)
    grown_face = resample_face(face, 1, (2, 4, 4), (2, 6, 5), read_side=False)  # [3, 60]
    grown_weights = resample_face(weights, 1, (2, 4, 4), (2, 6, 5), read_side=True)  # [7, 60]
    torch.testing.assert_close(grown_face @ grown_weights.T, face @ weights.T, rtol=1e-4, atol=1e-4)
    assert torch.allclose(_interp_matrix(4, 8).sum(1), torch.ones(8))  # rows are convex weights


def test_same_size_transfer_gives_identical_outputs():
    source, _ = _student(**{"train.seed": 3})
    target, _ = _student()
    table = transfer_weights(source, target)
    assert table.resampled == [] and table.fresh == []
    x = torch.randn(5, 384)
    torch.testing.assert_close(target(x).embedding, source(x).embedding, rtol=0, atol=0)


@pytest.mark.parametrize("change, key", [
    ({"lattice.state_size": 12}, "lattice.state_size"),
    ({"moe.experts": "local,distant"}, "moe.experts"),
    ({"moe.functional_radius": 1}, "moe.functional_radius"),
])
def test_what_cannot_transfer_is_named(change, key):
    source, _ = _student()
    target, _ = _student(**{**change, "lattice.size": 6})
    with pytest.raises(TransferError, match=key):
        transfer_weights(source, target)


def test_other_teacher_dimension_is_named():
    source, _ = _student()
    target = build_model(with_overrides(preset("test"), SMALL), 768)
    with pytest.raises(TransferError, match="teacher dimension 384 != 768"):
        transfer_weights(source, target)


def test_grow_schedule_parses_and_stages_follow_it():
    config = with_overrides(preset("wide"), {"train.main_epochs": 5, "train.grow_schedule": "8x2+12x1"})
    dims = [stage_config(config, e).lattice.dims for e in range(5)]
    assert dims == [(8, 8, 8), (8, 8, 8), (8, 12, 12), (8, 16, 16), (8, 16, 16)]
    for bad in ("8:2", "8x0", "8x5", "1x1"):
        with pytest.raises(ConfigError, match="train.grow_schedule"):
            with_overrides(config, {"train.grow_schedule": bad})


@pytest.fixture(scope="module")
def tiny(warm_cache):
    config = with_overrides(preset("test"), {**TINY, "data.cache_dir": str(warm_cache)})
    return config, prepare_data(config, torch.device("cpu"))


@pytest.fixture(scope="module")
def small_checkpoint(tiny, tmp_path_factory):
    config, data = tiny
    folder = tmp_path_factory.mktemp("transfer") / "small"
    train(config, data=data, out_dir=folder, progress=False)
    return folder


@pytest.mark.slow
def test_transferred_student_round_trips_through_its_checkpoint(tiny, small_checkpoint, tmp_path):
    config, data = tiny
    big = with_overrides(config, {"lattice.size": 6, "lattice.depth": 4, "train.init_from": str(small_checkpoint)})
    result = train(big, data=data, out_dir=tmp_path / "big", progress=False)
    loaded, _, meta = load_student(tmp_path / "big")
    x = data.val[:8]
    result.model.eval()
    torch.testing.assert_close(loaded(x).embedding, result.model(x).embedding, rtol=0, atol=0)
    table = meta["transfer"]
    assert table["source_dims"] == [4, 4, 4] and table["target_dims"] == [4, 6, 6]
    assert any(e.startswith("transform.encode.weight") for e in table["resampled"])


@pytest.mark.slow
def test_grow_schedule_trains_small_then_target_and_resumes_across_the_step(tiny, tmp_path):
    config, data = tiny
    grown = with_overrides(config, {"lattice.size": 6, "train.main_epochs": 2, "train.grow_schedule": "4x1"})
    seen = []

    class Stop(Exception):
        pass

    def after_epoch(report):
        model, saved, _ = load_student(tmp_path / "run")  # each checkpoint loads at its own size
        seen.append((model.dims, report.metrics["face_numbers"]))
        if report.epoch == 1:
            raise Stop  # interrupted after the small stage; the resume must grow on schedule

    with pytest.raises(Stop):
        train(grown, data=data, out_dir=tmp_path / "run", progress=False, callbacks=[after_epoch])
    result = train(grown, data=data, out_dir=tmp_path / "run", resume_from=tmp_path / "run", progress=False,
                   callbacks=[after_epoch])
    assert seen == [((4, 4, 4), 16.0), ((6, 6, 6), 36.0)]  # baselines follow the cube of each epoch
    assert result.model.dims == (6, 6, 6) and len(result.history) == 1
    _, _, meta = load_student(tmp_path / "run")
    assert meta["epochs_done"] == 2
    assert meta["grow"][0]["epoch"] == 2 and meta["grow"][0]["source_dims"] == [4, 4, 4]


def _cli(*args, cwd):
    return subprocess.run([str(BIN / "cnn3d-train"), *args], capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"})


def test_init_from_bad_input_is_one_line_and_overwrites_nothing(tiny, small_checkpoint, tmp_path):
    config, _ = tiny
    out = tmp_path / "out"  # new: a failed start must not create it
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    sets = [f"--set=data.cache_dir={config.data.cache_dir}", "--set=data.max_sentences=60"]
    for source, words in ((not_a_checkpoint, "is not a cnn3d checkpoint"),
                          (small_checkpoint, "lattice.state_size 8 != 16")):
        run = _cli("--init-from", str(source), "--out", str(out), *sets, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], run.stderr
        assert not out.exists()


def test_load_student_rejects_a_folder_without_a_checkpoint(tmp_path):
    with pytest.raises(UserError, match="not a cnn3d checkpoint"):
        load_student(tmp_path)


def test_fresh_directions_break_the_low_rank_start_and_keep_the_carried_face_exact():
    """Interpolated encoder rows span only the source face's H*W directions; the fill adds the rest, and the
    decoder's fill reads nothing of an interpolated face, so decode' . A = decode still holds."""
    source, _ = _student(**{"train.seed": 1})
    plain, config = _student(**{"lattice.size": 6, "lattice.depth": 4})
    filled, _ = _student(**{"lattice.size": 6, "lattice.depth": 4})
    transfer_weights(source, plain, face_map="stretch")  # embed (the default) leaves no such directions
    table = transfer_weights(source, filled, fresh_directions=True, face_map="stretch")
    assert any(e.startswith("transform.encode.weight") and e.endswith("+ fresh directions") for e in table.resampled)
    rank = lambda m: int(torch.linalg.matrix_rank(m.detach().double(), rtol=1e-4))  # noqa: E731
    assert rank(plain.transform.encode.weight) == 16 and rank(filled.transform.encode.weight) == 36
    face = torch.randn(3, 16)  # a 1x4x4 face, interpolated onto the 6x6 face
    grown = resample_face(face, 1, (1, 4, 4), (1, 6, 6), read_side=False)
    for student in (plain, filled):
        torch.testing.assert_close(grown @ student.transform.decode.weight.T, face @ source.transform.decode.weight.T,
                                   rtol=1e-4, atol=1e-4)


def test_embed_places_the_source_face_unscaled_in_the_middle_and_keeps_fresh_cells_around_it():
    """train.transfer_face=embed: a 4x4 face inside a 6x6 one at offset 1; inside, every face-indexed tensor is the
    source's (write side and read side alike); outside, the target's own initialisation (LayerNorm scale 1, not 0)
    where the face is written or normalised, and zero where the decoder reads it, so the output is the block's."""
    source, _ = _student(**{"train.seed": 1})
    target, _ = _student(**{"lattice.size": 6, "lattice.depth": 4})
    init = {k: v.clone() for k, v in target.state_dict().items()}
    table = transfer_weights(source, target, face_map="embed")
    assert any(e.startswith("transform.encode.weight") and e.endswith("embedded, new cells fresh") for e in table.resampled)
    inside = torch.zeros(6, 6, dtype=torch.bool)
    inside[1:5, 1:5] = True
    inside = inside.flatten()  # face position y * W + x (face_channels 1)
    src, dst = source.state_dict(), target.state_dict()
    for key, axis in (("transform.encode.weight", 0), ("transform.encode.bias", 0), ("transform.norm_in.weight", 0),
                      ("transform.position", 0), ("transform.decode.weight", 1)):
        got = dst[key].movedim(axis, 0)
        torch.testing.assert_close(got[inside], src[key].movedim(axis, 0), rtol=0, atol=0)
        around = torch.zeros_like(got[~inside]) if key.startswith("transform.decode") else init[key].movedim(axis, 0)[~inside]
        torch.testing.assert_close(got[~inside], around, rtol=0, atol=0)
    assert init["transform.decode.weight"][:, ~inside].abs().sum() > 0  # zero by the transfer, not by construction
    assert torch.all(dst["transform.norm_in.weight"][~inside] == 1)
    cell = [k for k in dst if k.startswith(("processor.", "face_io.")) and not k.endswith(".links")]
    assert all(torch.equal(src[k], dst[k]) for k in cell)
    # shrinking keeps the middle cells
    small, _ = _student(**{"lattice.size": 2, "lattice.depth": 4})
    transfer_weights(source, small, face_map="embed")
    middle = torch.zeros(4, 4, dtype=torch.bool)
    middle[1:3, 1:3] = True
    torch.testing.assert_close(small.state_dict()["transform.encode.weight"], src["transform.encode.weight"][middle.flatten()])
    with pytest.raises(UserError, match="train.transfer_face 'tile'"):
        transfer_weights(source, small, face_map="tile")


def test_embed_carries_the_distant_links_so_the_embedded_block_mixes_the_same_partners():
    """A trained cell can depend on which partners its distant links reach (a redraw cost one source 0.72 -> 0.02,
    BENCHMARKS.md): with embed, the block's cells keep the source's partners, moved with the block; the new
    cells keep the target's own draw, so the pattern is still a valid one for the larger lattice."""
    source, _ = _student(**{"moe.seed": 3})
    target, _ = _student(**{"lattice.size": 6, "lattice.depth": 4})
    drawn = target.processor.experts["distant"].links.clone()
    table = transfer_weights(source, target, face_map="embed")
    assert any(e.startswith("processor.experts.distant.links") for e in table.resampled)
    src_expert, dst_expert = source.processor.experts["distant"], target.processor.experts["distant"]
    state = torch.randn(2, source.state_size, 4, 4, 4)  # [B, C, D, H, W] on the source lattice
    grown = torch.zeros(2, source.state_size, 4, 6, 6)
    grown[..., 1:5, 1:5] = state  # the same state in the middle of the target, zeros around it
    torch.testing.assert_close(dst_expert(grown)[..., 1:5, 1:5], src_expert(state))
    outside = torch.ones(4, 6, 6, dtype=torch.bool)
    outside[:, 1:5, 1:5] = False
    assert torch.equal(dst_expert.links[outside.flatten()], drawn[outside.flatten()])
    # stretch, or a shallower target, redraws them all (the block has no place to go)
    for face_map, dims in (("stretch", {"lattice.size": 6, "lattice.depth": 4}),
                           ("embed", {"lattice.size": 6, "lattice.depth": 3})):
        other, _ = _student(**dims)
        table = transfer_weights(source, other, face_map=face_map)
        assert any(e.startswith("processor.experts.distant.links") for e in table.redrawn)


def test_embed_into_a_deeper_cube_spreads_the_blocks_layers_front_to_back_and_keeps_their_links():
    """Growing 4x4x4 -> 7x6x6: the source's layers 0..3 land on the target's 0, 2, 4, 6 (the front face stays where
    the teacher writes, the back where the output is read), and each block cell links to its partners' new places."""
    source, _ = _student(**{"moe.seed": 3})
    target, _ = _student(**{"lattice.size": 6, "lattice.depth": 7})
    drawn = target.processor.experts["distant"].links.clone()
    table = transfer_weights(source, target, face_map="embed")
    assert any(e.startswith("processor.experts.distant.links") for e in table.resampled)
    place = torch.full((4, 4, 4), -1, dtype=torch.long)  # source cell (z, y, x) -> target flat index
    for z, z2 in enumerate((0, 2, 4, 6)):
        for y in range(4):
            for x in range(4):
                place[z, y, x] = (z2 * 6 + y + 1) * 6 + x + 1
    place = place.flatten()
    src_links = source.processor.experts["distant"].links
    dst_links = target.processor.experts["distant"].links
    assert torch.equal(dst_links[place], place[src_links])
    outside = torch.ones(7 * 6 * 6, dtype=torch.bool)
    outside[place] = False
    assert torch.equal(dst_links[outside], drawn[outside])


def test_embed_is_a_config_key_that_growing_uses(tmp_path):
    config = with_overrides(preset("test"), {**TINY, "train.main_epochs": 2, "train.grow_schedule": "3x1",
                                             "train.transfer_face": "embed", "data.cache_dir": str(tmp_path / "c")})
    train(config, data=prepare_data(config, torch.device("cpu")), out_dir=tmp_path / "run", progress=False)
    grown = [e for step in read_checkpoint_meta(tmp_path / "run")[1]["grow"] for e in step["resampled"]]
    assert grown and all(e.endswith("embedded, new cells fresh") for e in grown if e.startswith("transform.encode"))
    with pytest.raises(ConfigError, match="transfer_face"):
        with_overrides(preset("test"), {"train.transfer_face": "tile"})


@pytest.mark.parametrize("init_from, cube", [("", 1.0), ("none", 1.0), ("runs/small", 0.3)])
def test_a_transferred_cube_trains_at_transfer_lr_mult_of_its_face_maps(init_from, cube):
    """With train.init_from the gate and experts (trained) move at ``train.transfer_lr_mult`` of the maps' lr."""
    from cnn3d.train import build_optimizer

    config = with_overrides(preset("test"), {"train.init_from": init_from, "train.lr": 1e-2,
                                             "train.lr_mult_local": 2.0, "train.transfer_lr_mult": 0.3})
    lrs = {g["name"]: g["lr"] for g in build_optimizer(build_model(config, 16), config).param_groups}
    assert lrs["transform"] == pytest.approx(1e-2)
    assert lrs["gating"] == pytest.approx(1e-2 * cube) and lrs["local"] == pytest.approx(2e-2 * cube)
    # once the readout is refitted the maps are no longer partly new: they fine-tune with the cube
    refitted = {g["name"]: g["lr"] for g in build_optimizer(build_model(config, 16), config, refitted=True).param_groups}
    assert refitted["transform"] == pytest.approx(1e-2 * cube) and refitted["gating"] == pytest.approx(1e-2 * cube)


@pytest.mark.parametrize("refit, maps", [("never", 1e-2), ("transfer", 2.5e-3)])
def test_a_grown_cube_trains_at_grow_lr_mult_of_its_face_maps(tiny, tmp_path, refit, maps):
    """After a growth step the gate and experts move at ``train.grow_lr_mult`` of their lr; the face maps at theirs,
    or with the cube once the readout was refitted at the growth step."""
    config, data = tiny
    grown = with_overrides(config, {"lattice.size": 6, "train.main_epochs": 2, "train.grow_schedule": "4x1",
                                    "train.lr": 1e-2, "train.grow_lr_mult": 0.25, "train.scheduler": "constant",
                                    "train.readout_refit": refit})
    train(grown, data=data, out_dir=tmp_path / "run", progress=False)
    groups = json.loads((tmp_path / "run" / "optimizer.json").read_text())["param_groups"]
    lrs = {g["name"]: g["base_lr"] for g in groups}
    assert lrs["transform"] == pytest.approx(maps)
    assert lrs["gating"] == pytest.approx(2.5e-3) and lrs["local"] == pytest.approx(2.5e-3)
    assert ("readout_refit" in read_checkpoint_meta(tmp_path / "run")[1]["grow"][0]) == (refit == "transfer")
    from cnn3d.train import build_optimizer  # before any growth: one lr for all

    small = build_optimizer(build_model(grown, 16), grown)
    assert {g["name"]: g["lr"] for g in small.param_groups}["gating"] == pytest.approx(1e-2)


def _face_features(model, x):
    with torch.no_grad():
        return model.transform.norm_out(model(x).face_out.flatten(1)).double()


def test_readout_refit_solves_the_ridge_equations_of_a_linear_readout():
    """``refit_readout`` leaves the cube and encoder alone and puts the linear decoder at the ridge optimum over the
    back faces: ``z^T (Y - z W^T - b) = r W^T`` with an unpenalised bias (``z^T`` row sums of the residual vanish)."""
    model, _ = _student(**{"transform.kind": "linear"})
    x = torch.randn(96, 384, generator=torch.Generator().manual_seed(1))
    encoder = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("transform.decode")}
    fit = refit_readout(model, x, 32, torch.device("cpu"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in encoder.items())
    z, decode = _face_features(model, x), model.transform.decode
    residual = x.double() - z @ decode.weight.double().T - decode.bias.double()
    ridge = REFIT_RIDGE * (z * z).sum(0).mean()
    torch.testing.assert_close(z.T @ residual, ridge * decode.weight.double().T, atol=2e-3, rtol=1e-3)
    assert residual.sum(0).abs().max() < 1e-2  # the bias: no penalty, so the mean residual is zero
    with torch.no_grad():
        after = torch.nn.functional.cosine_similarity(model(x).embedding, x).mean().item()
    assert fit["cosine_after"] == pytest.approx(after, abs=1e-4) and after > fit["cosine_before"] + 0.1
    assert fit["rows"] == 96


def test_readout_refit_fits_the_skip_of_a_residual_readout_and_skips_a_readout_without_one():
    """``hierarchical``: the linear skip is fitted with the MLP body held fixed; ``autoencoder`` has no linear part
    (None, nothing changed)."""
    x = torch.randn(64, 384, generator=torch.Generator().manual_seed(2))
    model, _ = _student(**{"transform.kind": "hierarchical", "transform.hidden_sizes": (32,)})
    body = {k: v.clone() for k, v in model.transform.decode.body.state_dict().items()}
    fit = refit_readout(model, x, 16, torch.device("cpu"))
    assert all(torch.equal(v, model.transform.decode.body.state_dict()[k]) for k, v in body.items())
    with torch.no_grad():
        after = torch.nn.functional.cosine_similarity(model(x).embedding, x).mean().item()
    assert fit["cosine_after"] == pytest.approx(after, abs=1e-4) and after > fit["cosine_before"]
    plain, _ = _student(**{"transform.kind": "autoencoder", "transform.hidden_sizes": (32,)})
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert refit_readout(plain, x, 16, torch.device("cpu")) is None
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())


@pytest.mark.slow
def test_readout_refit_follows_its_key_and_is_kept_in_the_meta(tiny, small_checkpoint, tmp_path):
    """``transfer`` (default) refits after ``--init-from`` and says so in the transfer's table; ``never`` does not;
    ``always`` refits a scratch run too, and a default scratch run is not refitted."""
    config, data = tiny
    big = with_overrides(config, {"lattice.size": 6, "train.init_from": str(small_checkpoint)})
    for mode in ("transfer", "never"):
        train(with_overrides(big, {"train.readout_refit": mode}), data=data, out_dir=tmp_path / mode, progress=False)
    refit = read_checkpoint_meta(tmp_path / "transfer")[1]["transfer"]["readout_refit"]
    assert refit["cosine_after"] > refit["cosine_before"] and refit["rows"] == len(data.train)
    assert "readout_refit" not in read_checkpoint_meta(tmp_path / "never")[1]["transfer"]
    for mode, together in (("transfer", True), ("never", False)):  # refitted maps fine-tune with the cube
        lrs = {g["name"]: g["base_lr"] for g in
               json.loads((tmp_path / mode / "optimizer.json").read_text())["param_groups"]}
        assert (lrs["transform"] == pytest.approx(lrs["gating"])) == together
    scratch = with_overrides(config, {"train.readout_refit": "always"})
    train(scratch, data=data, out_dir=tmp_path / "scratch", progress=False)
    meta = read_checkpoint_meta(tmp_path / "scratch")[1]
    assert "transfer" not in meta and meta["readout_refit"]["cosine_after"] > meta["readout_refit"]["cosine_before"]
    train(config, data=data, out_dir=tmp_path / "default", progress=False)
    assert "readout_refit" not in read_checkpoint_meta(tmp_path / "default")[1]  # scratch: off by default
