"""Streaming fold of safetensors folders layer by layer (netfold.scale, netfold.fold.stream).

Run: PYTHONPATH=src python -m pytest -q tests/test_scale.py
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

import netfold
from netfold.bench import synthetic
from netfold.fold import stream as S
from netfold.hub import load_pretrained
from netfold.scale import STREAM_AUTO_WARNING, _resolve_auto, estimate_float32_bytes, fold_folder

ROOT = Path(__file__).resolve().parents[1]
TINY = synthetic.SHAPES["tiny"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny synthetic checkpoints: fp32 and bf16, several shards each."""
    g = synthetic
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        # ~60 kB shards: the 3-layer model spreads over several files, layers across shards
        out[name] = g.write_checkpoint(root / name, TINY, dtype=dt, shard_bytes=60_000)
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _in_ram(src: Path, config: netfold.FoldConfig, dtype=torch.float32):
    """The in-RAM fold with what "auto" means for streaming (uniform widths, repair "ar")."""
    model = load_pretrained(src, dtype=dtype)
    config, _ = _resolve_auto(config)
    netfold.fold(model, config)
    return model


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_is_sharded(ckpts):
    ck = S.Checkpoint(ckpts["fp32"])
    assert len(ck.files) >= 3
    assert (ckpts["fp32"] / S.INDEX).is_file()
    assert ck.dtype() == torch.float32 and S.Checkpoint(ckpts["bf16"]).dtype() == torch.bfloat16
    n = sum(p.numel() for p in load_pretrained(ckpts["fp32"]).state_dict().values())
    assert estimate_float32_bytes(ckpts["fp32"]) == 4 * n


def test_stream_equals_in_ram_fold_fp32(ckpts, tmp_path):
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    out = tmp_path / "out"
    rep = fold_folder(ckpts["fp32"], out, cfg, threads=1, device="cpu")
    ref = _in_ram(ckpts["fp32"], cfg)
    got = load_pretrained(out)
    _assert_same_state(ref.state_dict(), got.state_dict())
    ids = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
    # widths as the in-RAM planner gives them; the sparsity is the requested one
    assert rep.extra["non_embedding_sparsity"] == pytest.approx(0.2, abs=0.03)
    assert [g.width_after for g in rep.groups][1] < TINY["intermediate_size"]
    assert not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())
    # negative control: another seed folds differently, so the equality above is not vacuous
    other = _in_ram(ckpts["fp32"], netfold.FoldConfig(target_sparsity=0.2, seed=1))
    assert any(not torch.equal(v, other.state_dict()[k]) for k, v in got.state_dict().items())


def test_stream_equals_in_ram_fold_float64(ckpts, tmp_path):
    cfg = netfold.FoldConfig(ratio=0.25, repair="none")
    fold_folder(ckpts["fp32"], tmp_path / "o", cfg, threads=1, compute_dtype=torch.float64)
    ref = _in_ram(ckpts["fp32"], cfg, dtype=torch.float64)
    got = load_pretrained(tmp_path / "o", dtype=torch.float64)
    # the output keeps the input's float32; the float64 fold rounded once at the end
    ref32 = {k: v.to(torch.float32).to(torch.float64) for k, v in ref.state_dict().items()}
    _assert_same_state(ref32, got.state_dict())


def test_bf16_stays_bf16_and_equals_in_ram(ckpts, tmp_path):
    from safetensors import safe_open

    cfg = netfold.FoldConfig(target_sparsity=0.2)
    out = tmp_path / "o"
    fold_folder(ckpts["bf16"], out, cfg, threads=1)
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            assert {h.get_tensor(k).dtype for k in h.keys()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # in RAM: the bf16 checkpoint loaded as float32, folded, cast back to bf16
    ref = _in_ram(ckpts["bf16"], cfg).to(torch.bfloat16)
    _assert_same_state(ref.state_dict(), load_pretrained(out).state_dict())
    # sharded like the input, with an index
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        S.Checkpoint(ckpts["bf16"]).files
    )
    assert (out / S.INDEX).is_file()


def test_uniform_widths_reload_with_from_pretrained(ckpts, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = netfold.FoldConfig(ratio=0.25)
    out = tmp_path / "o"
    fold_folder(ckpts["fp32"], out, cfg, threads=1)
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert stock.config.intermediate_size == 132
    ref = _in_ram(ckpts["fp32"], cfg)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, ref(ids).logits)


def test_per_layer_widths_reload_with_netfold_load(ckpts, tmp_path):
    cfg = netfold.FoldConfig(ratio=0.25, ratios={"model.layers.1.*": 0.5})
    out = tmp_path / "o"
    rep = fold_folder(ckpts["fp32"], out, cfg, threads=1)
    saved = json.loads((out / "config.json").read_text())
    widths = saved["netfold_layer_widths"]
    assert [w["intermediate_size"] for w in widths] == [132, 88, 132]
    assert rep.extra["save_format"] in ("stock config", "netfold extension")
    got, _tok, _info = netfold.hub.load(str(out))
    ref = _in_ram(ckpts["fp32"], cfg)
    _assert_same_state(ref.state_dict(), got.state_dict())
    ids = torch.arange(16).reshape(2, 8)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, ref(ids).logits)


def test_resume_after_kill_gives_identical_bytes(ckpts, tmp_path):
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    full = tmp_path / "full"
    fold_folder(ckpts["bf16"], full, cfg, threads=1)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated kill"):
        fold_folder(ckpts["bf16"], out, cfg, threads=1, _stop_after=2)
    assert not out.exists()  # never a partial output folder
    work = S.WorkDir.beside(out)
    assert work.done(0) and work.done(1) and not work.done(2)
    rep = fold_folder(ckpts["bf16"], out, cfg, threads=1)
    assert rep.extra["layers_reused"] == [0, 1]
    assert _files(out) == _files(full)
    assert not work.path.exists()
    # a work folder left by another plan is not reused
    with pytest.raises(RuntimeError):
        fold_folder(ckpts["bf16"], tmp_path / "x", cfg, threads=1, _stop_after=1)
    other = netfold.FoldConfig(target_sparsity=0.3)
    rep = fold_folder(ckpts["bf16"], tmp_path / "x", other, threads=1)
    assert rep.extra["layers_reused"] == []


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists() or not any(out.iterdir())
    assert not any(p.name.startswith(f".{out.name}") for p in tmp_path.iterdir())


def test_bad_inputs_raise_before_writing(ckpts, tmp_path):
    cfg = netfold.FoldConfig(ratio=0.25)
    out = tmp_path / "out"
    bad = _copy(ckpts["fp32"], tmp_path / "missing")
    sorted(bad.glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(ValueError, match="is missing"):
        fold_folder(bad, out, cfg)
    _nothing_written(tmp_path, out)

    unknown = _copy(ckpts["fp32"], tmp_path / "unknown")
    c = json.loads((unknown / "config.json").read_text())
    c["model_type"] = "not-a-model"
    (unknown / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="unsupported model_type 'not-a-model'"):
        fold_folder(unknown, out, cfg)
    _nothing_written(tmp_path, out)

    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        fold_folder(ckpts["fp32"], out, cfg)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    with pytest.raises(ValueError, match="data-free"):
        fold_folder(ckpts["fp32"], tmp_path / "o2", netfold.FoldConfig(repair="dir"))
    with pytest.raises(ValueError, match="config.json says"):
        broken = _copy(ckpts["fp32"], tmp_path / "shape")
        c = json.loads((broken / "config.json").read_text())
        c["intermediate_size"] = 100
        (broken / "config.json").write_text(json.dumps(c))
        fold_folder(broken, tmp_path / "o3", cfg)
    _nothing_written(tmp_path, tmp_path / "o2")
    _nothing_written(tmp_path, tmp_path / "o3")


def test_device_option(ckpts, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the unavailable-device error cannot be shown")
    with pytest.raises(ValueError, match="CUDA is not available"):
        fold_folder(ckpts["fp32"], tmp_path / "o", netfold.FoldConfig(ratio=0.25), device="cuda")
    with pytest.raises(ValueError, match="unknown device"):
        fold_folder(ckpts["fp32"], tmp_path / "o", netfold.FoldConfig(ratio=0.25), device="tpu9")
    _nothing_written(tmp_path, tmp_path / "o")


@pytest.mark.slow
def test_two_local_workers_give_identical_bytes(ckpts, tmp_path):
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    fold_folder(ckpts["bf16"], tmp_path / "one", cfg, threads=1)
    rep = fold_folder(ckpts["bf16"], tmp_path / "two", cfg, threads=1, workers=2)
    assert rep.extra["mode"] == "processes"
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_two_workers_give_identical_bytes(ckpts, tmp_path):
    import ray

    cfg = netfold.FoldConfig(target_sparsity=0.2)
    fold_folder(ckpts["bf16"], tmp_path / "one", cfg, threads=1)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rep = fold_folder(ckpts["bf16"], tmp_path / "ray", cfg, threads=1, ray_address="auto")
    finally:
        ray.shutdown()
    assert rep.extra["mode"] == "ray"
    assert _files(tmp_path / "one") == _files(tmp_path / "ray")


def test_cli_stream(ckpts, tmp_path, capsys):
    from netfold.cli import main

    out = tmp_path / "cli"
    rc = main(
        [
            "fold",
            str(ckpts["bf16"]),
            "--out",
            str(out),
            "--stream",
            "--ratio",
            "0.25",
            "--threads",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert "layer 2" in capsys.readouterr().out
    ref = tmp_path / "api"
    fold_folder(ckpts["bf16"], ref, netfold.FoldConfig(ratio=0.25), threads=1)
    assert _files(out) == _files(ref)


def test_cli_streams_when_the_model_would_not_fit(ckpts, tmp_path, capsys, monkeypatch):
    import netfold.scale
    from netfold.cli import main

    monkeypatch.setattr(netfold.scale, "available_memory", lambda: 1000)
    out = tmp_path / "auto"
    assert (
        main(["fold", str(ckpts["bf16"]), "--out", str(out), "--ratio", "0.25", "--threads", "1"])
        == 0
    )
    assert "would not fit in memory" in capsys.readouterr().out
    ref = tmp_path / "api"
    fold_folder(ckpts["bf16"], ref, netfold.FoldConfig(ratio=0.25), threads=1)
    assert _files(out) == _files(ref)


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_stream_equals_in_ram(tmp_path):
    from netfold.hub import SMOLLM2_CACHE

    if not (SMOLLM2_CACHE / "config.json").is_file():
        pytest.skip(f"no SmolLM2 export at {SMOLLM2_CACHE} (netfold.hub.load_smollm2 makes it)")
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    fold_folder(SMOLLM2_CACHE, tmp_path / "o", cfg, threads=1)
    ref = _in_ram(SMOLLM2_CACHE, cfg)
    _assert_same_state(ref.state_dict(), load_pretrained(tmp_path / "o").state_dict())


def test_large_group_projection_matches_full_features(tmp_path):
    """Groups of >= LARGE_GROUP channels cluster on projected weight features that are never
    formed; the projection and the exact cost must equal the ones from the full matrix."""
    from netfold.families.llama import HOOKS, overlay
    from netfold.fold import llm as L
    from netfold.fold.cluster import folding_cost

    g = synthetic
    shape = dict(TINY, hidden_size=32, intermediate_size=L.LARGE_GROUP, num_hidden_layers=2)
    src = g.write_checkpoint(tmp_path / "wide", shape, dtype=torch.float32)
    model = load_pretrained(src)
    grp = [x for x in HOOKS.groups(model, "query") if x.name.endswith("0.mlp")][0]
    view = overlay(model)
    X = L.mlp_features(view, grp)  # (4096, 96) float32 (a large group)
    assert X.dtype == torch.float32
    p = 16
    gen = torch.Generator().manual_seed(3)
    R = torch.cat([torch.randn(32, p, generator=gen) for _ in range(3)])  # gate, up, down
    Z = L.mlp_projected_features(view, grp, p, seed=3)
    torch.testing.assert_close(Z, X @ R / p**0.5, rtol=1e-4, atol=1e-6)
    labels = torch.arange(grp.size) % 1000
    assert L.mlp_folding_cost(view, grp, labels, 1000) == pytest.approx(
        folding_cost(X, labels, 1000), rel=1e-5
    )
    # negative control: another seed projects differently
    assert not torch.allclose(Z, L.mlp_projected_features(view, grp, p, seed=4))
    # the streaming fold takes the same large-group path as the in-RAM fold: same bytes
    cfg = netfold.FoldConfig(target_sparsity=0.2)
    fold_folder(src, tmp_path / "o", cfg, threads=1)
    ref = _in_ram(src, cfg)
    _assert_same_state(ref.state_dict(), load_pretrained(tmp_path / "o").state_dict())
    assert ref.config.intermediate_size < L.LARGE_GROUP


def test_cluster_map_index_form_equals_dense(monkeypatch):
    """Large clusterings apply their maps with index sums; same results as the dense form."""
    from netfold.fold import llm as L

    gen = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(40), torch.randint(0, 40, (60,), generator=gen)])
    r = torch.randn(100, 7, dtype=torch.float64, generator=gen)
    d = torch.randn(5, 100, dtype=torch.float64, generator=gen)
    w = torch.rand(100, dtype=torch.float64, generator=gen)
    dense = L.ClusterMap(labels, 40)
    assert dense.dense
    monkeypatch.setattr(L, "DENSE_MAP_MAX", 0)
    sparse = L.ClusterMap(labels, 40)
    assert not sparse.dense
    torch.testing.assert_close(sparse.mean(r), dense.mean(r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.mean(r[:, 0]), dense.mean(r[:, 0]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.sum_cols(d, w), dense.sum_cols(d, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse.sizes, dense.sizes)
    # negative control: a different clustering gives different means
    assert not torch.allclose(L.ClusterMap(labels.roll(1), 40).mean(r), dense.mean(r))
    with pytest.raises(ValueError, match="empty cluster"):
        L.ClusterMap(labels, 41)


def test_auto_streaming_resolves_to_the_weight_recipe_and_says_so(ckpts, tmp_path):
    """ "auto" cannot mean the in-RAM text recipe here: it becomes uniform/"ar", loudly."""
    with pytest.warns(UserWarning, match="streaming fold: repair/allocation 'auto'"):
        rep = fold_folder(ckpts["fp32"], tmp_path / "o", netfold.FoldConfig(ratio=0.25))
    assert STREAM_AUTO_WARNING in rep.warnings
    assert rep.config["repair"] == "ar" and rep.config["allocation"] == "uniform"
    explicit = netfold.FoldConfig(ratio=0.25, repair="none", allocation="uniform")
    assert _resolve_auto(explicit) == (explicit, None)  # negative control: nothing to resolve
