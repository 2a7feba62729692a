"""Continual learning over data.domains: built-in domains, remedies, the forgetting matrix, bad input."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from cnn3d import preset, with_overrides
from cnn3d.checkpoint import load_weights, open_checkpoint
from cnn3d.cli import train_cli
from cnn3d.config import ConfigError
from cnn3d.continual import (
    EWC,
    ReplayBatches,
    ReplayBuffer,
    add_expert,
    continual_summary,
    freeze_groups,
    prepare_domains,
    run_continual,
)
from cnn3d.data import load_corpus
from cnn3d.domains import BUILTIN_DOMAINS, builtin_domain_sentences, domain_label
from cnn3d.errors import UserError
from cnn3d.model import build_model
from cnn3d.train import _Loop, _train_epoch, build_optimizer, is_reported_metric

# science and dialogue open with built-in sentences, so 40 of each come from the warmed cache
TINY = {"lattice.size": 4, "lattice.steps": 2, "lattice.state_size": 4, "data.max_sentences": 40,
        "train.main_epochs": 1, "train.batch_size": 16, "data.domains": "builtin:science,builtin:dialogue"}


@pytest.fixture(scope="module")
def tiny(warm_cache):
    config = with_overrides(preset("test"), {**TINY, "data.cache_dir": str(warm_cache)})
    return config, prepare_domains(config, torch.device("cpu"))


# --------------------------------------------------------------------------- domains


def test_builtin_domains_are_disjoint_styles_of_the_shipped_corpora():
    sets = {name: builtin_domain_sentences(name) for name in BUILTIN_DOMAINS}
    assert all(len(s) >= 140 for s in sets.values())
    names = list(sets)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(sets[a]) & set(sets[b]), (a, b)
    assert sum(s.startswith('"') for s in sets["dialogue"]) >= 70  # quoted speech
    assert "The defendant pleaded not guilty to all charges." in sets["news"]


def test_builtin_domain_is_a_corpus_spec_and_unknown_names_fail():
    corpus = load_corpus(with_overrides(preset("test"), {"data.corpus": "builtin:science"}).data)
    assert len(corpus) == 150 and corpus.train and corpus.validation
    with pytest.raises(UserError, match="builtin:news"):
        builtin_domain_sentences("sport")
    assert [domain_label(s) for s in ("builtin:news", "data/chat.txt", "hf:ag_news:test")] == \
        ["news", "chat", "ag_news_test"]


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("overrides", "message"), [
    ({"data.domains": "builtin:news"}, "at least two"),
    ({"continual.replay_fraction": 1.5}, "out of range [0.0, 1.0]"),
    ({"continual.replay_fraction": -0.1}, "out of range [0.0, 1.0]"),
    ({"continual.freeze": "gate"}, "must be distinct names from transform, gating"),
    ({"data.domains": ("builtin:news", " ")}, "empty entry"),
    ({"continual.freeze": "transform,gating,local,functional,distant"}, "freezes every parameter group"),
    ({"continual.new_expert": True, "continual.joint": True}, "drop one of the two"),
    ({"continual.new_expert": True, "moe.experts": "functional,distant"}, "add local to moe.experts"),
    ({"continual.new_expert": True, "moe.gating": "topk", "moe.top_k": 2}, "needs moe.gating=softmax"),
    ({"moe.experts": "local,local1"}, "local2, local3, ... as added by continual.new_expert"),
    ({"data.domains": "builtin:news,builtin:dialogue", "train.grow_schedule": "4x1", "train.main_epochs": 3},
     "not supported over data.domains"),
])
def test_bad_continual_config_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError) as info:
        with_overrides(preset("test"), overrides)
    assert message in str(info.value)


def test_continual_metrics_are_tuner_objectives():
    for name in ("avg_final_cosine", "forgetting", "new_domain_cosine", "cl_matrix/2/news"):
        assert is_reported_metric(name)
    assert not is_reported_metric("forgeting")


# --------------------------------------------------------------------------- the summary


def test_summary_forgetting_is_the_drop_from_each_earlier_domains_best():
    matrix = [[0.5, 0.1, 0.0],
              [0.4, 0.6, 0.1],
              [0.3, 0.5, 0.7]]
    out = continual_summary(matrix, ["a", "b", "c"])
    assert out["avg_final_cosine"] == pytest.approx(0.5)
    # a: best 0.5 (stages 1-2) -> 0.3 = 0.2 ; b: best 0.6 (stage 2) -> 0.5 = 0.1
    assert out["cl_forgetting/a"] == pytest.approx(0.2) and out["cl_forgetting/b"] == pytest.approx(0.1)
    assert out["forgetting"] == pytest.approx(0.15)
    assert out["new_domain_cosine"] == pytest.approx((0.5 + 0.6 + 0.7) / 3)
    assert out["last_domain_cosine"] == pytest.approx(0.7)
    assert continual_summary([[0.4, 0.6]], ["a", "b"], joint=True)["forgetting"] == 0.0


# --------------------------------------------------------------------------- remedies


def test_replay_buffer_caps_rows_and_shares_them_between_stages():
    g = torch.Generator().manual_seed(0)
    buffer = ReplayBuffer(10)
    buffer.add(torch.zeros(30, 3), g)
    assert len(buffer.rows) == 10 and buffer.nbytes == 10 * 3 * 4
    buffer.add(torch.ones(30, 3), g)
    assert len(buffer.rows) == 10 and buffer.rows[:, 0].sum() == 5  # 5 from each stage


def test_replay_batches_put_the_fraction_of_buffer_rows_in_each_batch():
    current, old = torch.arange(20.0)[:, None], torch.full((4, 1), -1.0)
    batches = ReplayBatches(current, old, 0.25, torch.Generator().manual_seed(0))
    batch = batches[torch.arange(8)]
    assert batch.shape == (8, 1) and (batch == -1).sum() == 2 and batch[:6, 0].tolist() == list(range(6))
    assert (ReplayBatches(current, old, 1.0, torch.Generator())[torch.arange(8)] == -1).all()
    assert (ReplayBatches(current, old, 0.0, torch.Generator())[torch.arange(8)] >= 0).all()


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_with_drift(tiny):
    config, domains = tiny
    model = build_model(config, 384)
    ewc = EWC(10.0)
    ewc.consolidate(model, domains[0].data.train, config, torch.device("cpu"), None, 0, torch.Generator())
    assert ewc.seconds > 0
    mean_fisher = sum(f.sum() for f in ewc.fisher.values()) / sum(f.numel() for f in ewc.fisher.values())
    assert mean_fisher.item() == pytest.approx(1.0, rel=1e-4)  # normalised to mean 1
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    small = ewc.penalty(model).item()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert 0 < small < ewc.penalty(model).item()


def test_frozen_groups_do_not_change_while_the_rest_trains(tiny):
    config, domains = tiny
    device = torch.device("cpu")
    model = build_model(config, 384)
    freeze_groups(model, ["gating", "local"])
    groups = model.parameter_groups()
    before = {k: [p.detach().clone() for p in v] for k, v in groups.items()}
    loop = _Loop(config, model, build_optimizer(model, config), device, None, None, 10, 1)
    _train_epoch(loop, domains[0].data.train, torch.arange(len(domains[0].data.train)), "main", "t", False)
    for name in ("gating", "local"):
        assert all(torch.equal(a, b) for a, b in zip(before[name], groups[name]))
    assert not all(torch.equal(a, b) for a, b in zip(before["transform"], groups["transform"]))
    with pytest.raises(UserError, match="freezes every parameter group"):
        freeze_groups(model, list(groups))


# --------------------------------------------------------------------------- the stage loop


def test_sequence_reports_the_matrix_beside_ceilings_and_remedies_change_it(tiny):
    config, domains = tiny
    seen = []
    naive = run_continual(with_overrides(config, {"continual.baselines": True}), domains=domains,
                          callbacks=[lambda r: seen.append((r.epoch, r.metrics["stage"]))])
    m = naive.metrics
    assert seen == [(1, 1), (2, 2)]
    cells = {f"cl_matrix/{s}/{d}" for s in (1, 2) for d in ("science", "dialogue")}
    assert cells <= set(m)
    assert all(-1 <= m[k] <= 1 for k in cells)
    assert 0 < m["cl_pca/science"] <= 1 and 0 < m["cl_mean/dialogue"] <= 1
    assert m["avg_final_cosine"] == pytest.approx((m["cl_matrix/2/science"] + m["cl_matrix/2/dialogue"]) / 2)
    assert m["forgetting"] == pytest.approx(m["cl_matrix/1/science"] - m["cl_matrix/2/science"])
    assert "val_cosine" in m and "baseline_pca_cosine" in m  # the usual metrics, on the union of validation splits
    assert m["cl_fisher_seconds"] == 0.0 and m["cl_replay_bytes"] == 0.0
    # stage 1 is the same in every variant (remedies act from stage 2 on); stage 2 differs
    remedied = run_continual(with_overrides(config, {"continual.ewc_lambda": 50.0, "continual.replay_size": 16,
                                                     "continual.freeze": "gating"}), domains=domains).metrics
    assert remedied["cl_matrix/1/science"] == m["cl_matrix/1/science"]
    assert remedied["cl_matrix/2/science"] != m["cl_matrix/2/science"]
    assert remedied["cl_fisher_seconds"] > 0 and remedied["cl_replay_bytes"] == 16 * 384 * 4
    # continual.baselines: naive (this run itself), joint (one stage on both) and a single-domain run, in the same run
    assert m["cl_naive/forgetting"] == m["forgetting"]
    cut = 0.0 if m["forgetting"] > 0 else float("nan")  # undefined when naive forgets nothing
    assert m["cl_forgetting_cut"] == pytest.approx(cut, nan_ok=True)
    assert m["cl_joint/forgetting"] == 0.0 and -1 < m["cl_joint/avg_final_cosine"] < 1
    assert m["cl_joint/avg_final_cosine"] == pytest.approx((m["cl_joint/science"] + m["cl_joint/dialogue"]) / 2)
    assert m["cl_joint/avg_final_cosine"] != m["avg_final_cosine"]
    assert m["cl_plasticity"] == pytest.approx(m["cl_matrix/2/dialogue"] / m["cl_single/dialogue"])
    assert "cl_single/science" not in m  # the first domain has nothing before it


# --------------------------------------------------------------------------- the CLI


def test_then_corpus_cli_writes_the_matrix_to_the_metrics_json(tmp_path, warm_cache):
    sets = [f"--set={k}={v}" for k, v in {**TINY, "data.cache_dir": str(warm_cache)}.items() if k != "data.domains"]
    result = CliRunner().invoke(train_cli, ["--corpus", "builtin:science", "--then-corpus", "builtin:dialogue", *sets,
                                            "--no-progress", "--log-level", "warning",
                                            "--metrics-json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.stderr
    assert "continual: avg_final_cosine" in result.stdout
    assert re.search(r"final: science -?\d\.\d{4} \(pca 0\.\d{4}\), dialogue -?\d\.\d{4} \(pca", result.stdout)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["config"]["data.domains"] == ["builtin:science", "builtin:dialogue"]
    assert "cl_matrix/2/science" in metrics and "forgetting" in metrics


@pytest.mark.parametrize(("args", "message"), [
    (["--corpus", "builtin:science", "--then-corpus", "EMPTY"], "is empty"),
    (["--corpus", "builtin:science", "--then-corpus", ""], "is not a corpus"),
    (["--set", "data.domains=builtin:science"], "at least two"),
    (["--corpus", "builtin:science", "--then-corpus", "builtin:dialogue", "--set", "continual.replay_fraction=2"],
     "out of range [0.0, 1.0]"),
    (["--corpus", "builtin:science", "--then-corpus", "builtin:sport"], "unknown built-in domain"),
    (["--corpus", "builtin:science", "--then-corpus", "builtin:science"], "twice"),
    (["--corpus", "builtin:science", "--then-corpus", "builtin:dialogue", "--set", "continual.new_expert=true",
      "--set", "continual.joint=true"], "drop one of the two"),
])
def test_bad_domain_input_is_one_line_exit_2(tmp_path, args, message):
    """In process: each fails before any teacher pass."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    result = CliRunner().invoke(train_cli, [*args, "--set", "train.main_epochs=1", "--log-level", "warning"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr


# --------------------------------------------------------------------------- progressive experts


@pytest.mark.parametrize("fused", [True, False])
def test_added_expert_leaves_the_output_unchanged_and_trains(tiny, fused):
    config, domains = tiny
    config = with_overrides(config, {"moe.gate_temperature": 0.5, "continual.new_expert": True})
    model = build_model(config, 384)
    with torch.no_grad():  # a gate that is not uniform, so the split must keep real shares
        model.processor.gate.bias.copy_(torch.tensor([0.7, -0.3, 0.2]))
        model.processor.gate.weight.normal_(0, 0.3)
    model.fused = fused
    x = domains[0].data.train[:8]
    before = model(x).embedding
    grown, grown_config, source = add_expert(model, config, torch.device("cpu"))
    grown.fused = fused
    assert grown.expert_names == ("local", "functional", "distant", "local2") and source == 0
    assert grown_config.moe.experts == grown.expert_names
    out = grown(x)
    assert torch.allclose(out.embedding, before, atol=1e-5)
    assert torch.allclose(out.gates[:, 0], out.gates[:, 3]) and out.gates[:, 0].mean() > 0.05  # the share, halved
    out.embedding.pow(2).sum().backward()
    assert grown.processor.experts["local2"].stencil.weight.grad.abs().sum() > 0
    third, _, source = add_expert(grown, grown_config, torch.device("cpu"))
    assert third.expert_names[-1] == "local3" and source == 3  # copies the newest local expert
    assert torch.allclose(third(x).embedding, before, atol=1e-5)


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def progressive(tiny, tmp_path_factory):
    """Two stages of two epochs, progressive experts with EWC and replay: the straight run and its checkpoint."""
    config, domains = tiny
    config = with_overrides(config, {"train.main_epochs": 2, "continual.new_expert": True,
                                     "continual.freeze": "gating,local,functional,distant",
                                     "continual.ewc_lambda": 1.0, "continual.replay_size": 16})
    out = tmp_path_factory.mktemp("progressive") / "ckpt"
    return config, domains, run_continual(config, domains=domains, out_dir=out), out


def test_progressive_run_saves_a_checkpoint_with_its_added_expert(progressive):
    config, domains, straight, out = progressive
    m = straight.metrics
    assert {"cl_matrix/2/science", "forgetting", "avg_final_cosine"} <= set(m)
    assert m["cl_fisher_seconds"] > 0 and m["cl_replay_bytes"] == 16 * 384 * 4
    assert straight.model.expert_names[-1] == "local2" and "expert_usage_local2" in m
    ckpt = open_checkpoint(out)
    assert ckpt.config.moe.experts == ("local", "functional", "distant", "local2")
    loaded = build_model(ckpt.config, ckpt.teacher_dim)
    load_weights(ckpt, loaded)
    x = domains[1].data.val[:8]
    assert torch.equal(loaded(x).embedding, straight.model.eval()(x).embedding)


@pytest.mark.parametrize("stop_after", [2, 3])  # the end of stage 1 (before the expert joins), inside stage 2
def test_interrupted_progressive_run_resumes_to_the_same_result(progressive, tmp_path, stop_after):
    config, domains, straight, _ = progressive
    out = tmp_path / "ckpt"

    def stop(report):
        if report.epoch == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        run_continual(config, domains=domains, out_dir=out, callbacks=[stop])
    saved = open_checkpoint(out)
    load_weights(saved, probe := build_model(saved.config, 384))
    frozen = {k: v.clone() for k, v in probe.state_dict().items()}
    with pytest.raises(UserError, match=r"differs in continual.new_expert \(True in the checkpoint, False now\)"):
        run_continual(with_overrides(config, {"continual.new_expert": False}), domains=domains, resume_from=out)
    # after the expert joined, resume as `--config ckpt/config.json` would: moe.experts already lists local2
    again = saved.config if stop_after == 3 else config
    assert again.moe.experts[-1] == ("local2" if stop_after == 3 else "distant")
    resumed = run_continual(again, domains=domains, out_dir=out, resume_from=out)
    assert [h["epoch"] for h in resumed.history] == list(range(stop_after + 1, 5))
    for key in ("cl_matrix/1/science", "cl_matrix/2/science", "cl_matrix/2/dialogue", "forgetting", "val_cosine"):
        assert resumed.metrics[key] == pytest.approx(straight.metrics[key], abs=1e-5), key
    final = resumed.model.state_dict()
    if stop_after == 3:  # stage 2 froze the old experts and the gate; only local2 and the transforms moved
        assert torch.equal(final["processor.experts.local.stencil.weight"], frozen["processor.experts.local.stencil.weight"])
        assert torch.equal(final["processor.gate.weight"], frozen["processor.gate.weight"])
        assert not torch.equal(final["processor.experts.local2.stencil.weight"],
                               frozen["processor.experts.local2.stencil.weight"])


def test_init_from_starts_the_first_stage_from_a_trained_student(tiny, progressive, tmp_path):
    config, domains = tiny
    source = run_continual(config, domains=domains, out_dir=tmp_path / "source")
    started = run_continual(with_overrides(config, {"train.init_from": str(tmp_path / "source")}), domains=domains,
                            out_dir=tmp_path / "next")
    assert "transfer" in open_checkpoint(tmp_path / "next").meta
    # one more stage-1 epoch on top of the trained student, not a fresh one
    assert started.metrics["cl_matrix/1/science"] != source.metrics["cl_matrix/1/science"]
    with pytest.raises(UserError, match="cannot transfer .* moe.experts"):  # before any training
        run_continual(with_overrides(config, {"train.init_from": str(progressive[3])}), domains=domains)
