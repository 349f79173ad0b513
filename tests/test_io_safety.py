"""Loading trusts nothing it reads; saves are atomic and verified; any head count saves.

Run: python -m pytest tests/test_io_safety.py -q   (add -m "slow or real" for the kill -9
and SmolLM2 GGUF tests)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import netfold
from netfold import atomic, cli, hub, io, registry
from netfold.families import llama
from netfold.fuse.verify import compare_outputs

ROOT = Path(__file__).resolve().parents[1]


def _mlp_save(path: Path) -> Path:
    torch.manual_seed(0)
    model = io.build("netfold:mlp", {"hidden": [16, 8]})
    return io.save(model, path)


def _plant(path: Path, **fields) -> Path:
    info = json.loads((path / "netfold.json").read_text())
    info.update(fields)
    (path / "netfold.json").write_text(json.dumps(info))
    return path


# ------------------------------------------------------------------ nothing from a file runs
PAYLOADS = [
    ("os:system", lambda m: {"command": f"touch {m}"}),
    ("posix:system", lambda m: {"command": f"touch {m}"}),
    ("subprocess:run", lambda m: {"args": ["touch", str(m)]}),
    ("subprocess:Popen", lambda m: {"args": ["touch", str(m)]}),
    ("builtins:exec", lambda m: {"source": f"open({str(m)!r}, 'w')"}),
    ("builtins:eval", lambda m: {"source": f"open({str(m)!r}, 'w')"}),
]


@pytest.mark.parametrize("arch, kwargs", PAYLOADS, ids=[p[0] for p in PAYLOADS])
def test_planted_callable_never_runs(tmp_path, arch, kwargs):
    marker = tmp_path / "pwned"
    d = _plant(_mlp_save(tmp_path / "m"), arch=arch, kwargs=kwargs(marker))
    with pytest.raises(ValueError, match=r"not registered.*register_arch"):
        netfold.load(d)
    # the CLI load paths (eval / fold) refuse it too, with exit code 2
    assert cli.main(["eval", str(d)]) == 2
    assert cli.main(["fold", str(d), "--ratio", "0.5"]) == 2
    assert not marker.exists()


def test_payload_is_live_negative_control(tmp_path):
    """The os:system payload does create its marker when actually called: the test above
    would notice if load ran it."""
    marker = tmp_path / "pwned"
    arch, kwargs = PAYLOADS[0]
    module, name = arch.split(":")
    getattr(__import__(module), name)(**kwargs(marker))
    assert marker.exists()


def test_registered_arch_round_trips_and_unregistered_is_refused(tmp_path):
    def net(width: int = 4) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Linear(3, width), torch.nn.ReLU())

    torch.manual_seed(0)
    model = net(5)
    io.save(model, tmp_path / "n", arch="mylib:Net", kwargs={"width": 5})
    with pytest.raises(ValueError, match=r"netfold.register_arch\('mylib:Net'"):
        netfold.load(tmp_path / "n")
    netfold.register_arch("mylib:Net", net)
    try:
        again = netfold.load(tmp_path / "n")
        x = torch.randn(2, 3)
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=1e-7)
    finally:
        registry.unregister_arch("mylib:Net")
    for bad in ("netfold:evil", "torchvision:evil", "noprefix"):
        with pytest.raises(ValueError):
            netfold.register_arch(bad, net)


@pytest.mark.parametrize(
    "arch, kwargs",
    [
        ("torchvision:resnet18", {"weights": "DEFAULT"}),
        ("torchvision:__builtins__", {}),
        ("netfold.families.encoders:build_hf", {"model_class": "pipeline", "config": {}}),
        (
            "netfold.families.encoders:build_hf",
            {
                "model_class": "BertModel",
                "config": {"model_type": "bert", "auto_map": {"AutoModel": "evil.Model"}},
            },
        ),
    ],
)
def test_known_prefixes_refuse_downloads_and_non_models(tmp_path, arch, kwargs):
    d = _plant(_mlp_save(tmp_path / "m"), arch=arch, kwargs=kwargs)
    with pytest.raises(ValueError):
        netfold.load(d)


HOSTILE_EDITS = [
    {"op": "import", "module": "os", "name": "system"},
    {"op": "replace", "module": "1", "spec": {"type": "subprocess.Popen", "args": ["true"]}},
    {"op": "replace", "module": "1", "spec": {"type": "Linear", "in_features": "os"}},
    {"op": "replace", "module": "__class__", "spec": {"type": "Identity"}},
    {"op": "setattr", "module": "1", "attrs": {"forward": 1}},
    {"op": "setattr", "module": "1", "attrs": {"__class__": 1}},
    {"op": "patch", "module": "1", "params": {}, "attrs": {"__dict__": {"forward": 1}}},
    {"op": "patch", "module": "1", "params": {"weight": [10**12]}, "attrs": {}},
    {"op": "patch", "module": "1", "params": {"_forward_hooks": [1]}, "attrs": {}},
    "not an object",
]


@pytest.mark.parametrize("edit", HOSTILE_EDITS, ids=range(len(HOSTILE_EDITS)))
def test_hostile_edit_is_refused(tmp_path, edit):
    d = _plant(_mlp_save(tmp_path / "m"), edits=[edit])
    with pytest.raises(ValueError, match="edit|module spec"):
        netfold.load(d)


def test_recorded_edits_still_replay(tmp_path):
    """Negative control for the edit checks: a real collapsed model's edits load."""
    torch.manual_seed(0)
    model = io.build("netfold:mlp", {"hidden": [16, 8]}).eval()
    netfold.collapse(model, netfold.CollapseConfig(lc=1.0))
    assert io.get_edits(model)
    io.save(model, tmp_path / "c")
    x = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(netfold.load(tmp_path / "c")(x), model(x), rtol=0, atol=1e-6)


def _hf_dir(tmp_path: Path, marker: Path, **cfg_extra) -> Path:
    d = tmp_path / "hf"
    _llama().save_pretrained(d)
    c = json.loads((d / "config.json").read_text())
    c.update(cfg_extra)
    (d / "config.json").write_text(json.dumps(c))
    (d / "evil_modeling.py").write_text(f"open({str(marker)!r}, 'w').close()\nModel = None\n")
    return d


@pytest.mark.parametrize(
    "extra",
    [
        {"auto_map": {"AutoModelForCausalLM": "evil_modeling.Model"}},
        {"auto_map": {"AutoConfig": "evil_modeling.Model"}, "trust_remote_code": True},
        {"model_type": "evil_type"},
    ],
)
def test_hf_remote_code_is_refused(tmp_path, extra):
    marker = tmp_path / "pwned"
    d = _hf_dir(tmp_path, marker, **extra)
    with pytest.raises(ValueError, match="custom code|model_type"):
        netfold.load(d)
    with pytest.raises(ValueError):
        hub.load_causal_lm(str(d))
    assert not marker.exists()


def test_hf_plain_folder_loads(tmp_path):
    """Negative control: the same folder without the planted fields loads."""
    d = _hf_dir(tmp_path, tmp_path / "unused")
    assert netfold.load(d).config.model_type == "llama"


# ------------------------------------------------------------------------------- integrity
def test_save_refuses_non_finite_before_writing(tmp_path):
    model = io.build("netfold:mlp", {"hidden": [16, 8]})
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'1.weight'.*non-finite"):
        io.save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # an earlier good save at the path survives the refused one
    good = _mlp_save(tmp_path / "g")
    before = load_file(str(good / "model.safetensors"))
    with pytest.raises(ValueError, match="non-finite"):
        io.save(model, good)
    after = load_file(str(good / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_detects_flipped_bytes(tmp_path):
    d = _mlp_save(tmp_path / "m")
    io.load(d)  # negative control: the intact save verifies
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data: safetensors still parses it
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        io.load(d)
    io.load(d, verify=False)  # the override loads what is there


def test_load_refuses_nan_even_with_matching_checksum(tmp_path):
    d = _mlp_save(tmp_path / "m")
    state = load_file(str(d / "model.safetensors"))
    state["3.weight"][0, 0] = float("inf")
    save_file(state, str(d / "model.safetensors"))
    info = json.loads((d / "netfold.json").read_text())
    info["sha256"] = {"model.safetensors": io.sha256_file(d / "model.safetensors")}
    (d / "netfold.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"'3.weight'.*non-finite"):
        io.load(d)
    assert cli.main(["eval", str(d)]) == 2
    m = io.load(d, verify=False)
    assert torch.isinf(m[3].weight).any()


def test_hf_checksums_and_nan(tmp_path):
    model = _llama()
    d = netfold.save(model, tmp_path / "hf", metadata={"note": 1})
    assert json.loads((d / "netfold_metadata.json").read_text()) == {"note": 1}
    assert set(json.loads((d / "netfold_checksums.json").read_text())["sha256"]) == {
        "model.safetensors"
    }
    netfold.load(d)
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        netfold.load(d)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match=r"model.norm.weight.*non-finite"):
        netfold.save(model, tmp_path / "hf2")
    assert not (tmp_path / "hf2").exists()


def test_io_keeps_to_the_netfold_format(tmp_path):
    """netfold.io writes and reads netfold folders only; netfold.save / load do both formats."""
    model = _llama()
    with pytest.raises(ValueError, match="save Hugging Face models with netfold.save"):
        io.save(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    d = netfold.save(model, tmp_path / "hf")  # negative control: the public save writes it
    with pytest.raises(FileNotFoundError, match="Hugging Face folder.*netfold.load"):
        io.load(d)
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(netfold.load(d)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_compare_outputs_rejects_nan():
    ok = compare_outputs([torch.ones(3)], [torch.ones(3)], rtol=0, atol=0)
    assert ok.ok  # negative control
    nan = torch.full((3,), float("nan"))
    for ref, out in ((nan, nan), (torch.ones(3), nan), (nan, torch.ones(3))):
        e = compare_outputs([ref], [out], rtol=1e-5, atol=1e-6)
        assert not e.ok and "non-finite" in e.reason


def test_fuse_refuses_nan_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    rep = netfold.fuse(torch.nn.Sequential(*[m for m in model]).eval(), example_inputs=x)
    assert rep.extra["verified"] and rep.extra["fusions_applied"] >= 1  # negative control
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        netfold.fuse(model, example_inputs=x)
    assert isinstance(model[1], torch.nn.BatchNorm2d)  # untouched


# ------------------------------------------------------------------------------- atomicity
def _llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    base = dict(
        hidden_size=16,
        intermediate_size=32,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_hidden_layers=1,
        vocab_size=32,
    )
    base.update(kw)
    return LlamaForCausalLM(LlamaConfig(**base)).eval()


def test_formats_replace_each_other_without_stale_files(tmp_path):
    d = tmp_path / "out"
    _mlp_save(d)
    netfold.save(_llama(), d)
    names = sorted(p.name for p in d.iterdir())
    assert "netfold.json" not in names and "config.json" in names
    assert netfold.load(d).config.model_type == "llama"
    _mlp_save(d)
    assert sorted(p.name for p in d.iterdir()) == ["model.safetensors", "netfold.json"]
    assert isinstance(netfold.load(d), torch.nn.Sequential)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary siblings


@pytest.mark.parametrize("fmt", ["netfold", "hf"])
def test_failed_save_keeps_previous_and_leaves_nothing(tmp_path, monkeypatch, fmt):
    d = tmp_path / "out"
    _mlp_save(d)
    before = (d / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    if fmt == "netfold":
        monkeypatch.setattr(io, "save_file", boom)
        model = io.build("netfold:mlp", {"hidden": [16, 8]})
    else:
        model = _llama()
        monkeypatch.setattr(type(model), "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        netfold.save(model, d)
    assert (d / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(OSError, match="disk full"):
        netfold.save(model, tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no empty folder either


def test_refuses_to_replace_a_folder_that_is_not_a_save(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier save"):
        _mlp_save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        _mlp_save(tmp_path / "f")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_recover_after_crash_between_renames(tmp_path):
    """Killed after "path -> old" and before "new -> path": load puts the old save back and
    removes the half-written new one."""
    d = _mlp_save(tmp_path / "m")
    want = load_file(str(d / "model.safetensors"))
    pid = _dead_pid()
    os.rename(d, tmp_path / f".m{atomic.OLD_TAG}{pid}-abcd")
    tmp = tmp_path / f".m{atomic.TMP_TAG}{pid}-abcd"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    got = io.load(d).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_recover_keeps_live_siblings_and_removes_finished_old(tmp_path):
    d = _mlp_save(tmp_path / "m")
    pid = _dead_pid()
    (tmp_path / f".m{atomic.OLD_TAG}{pid}-abcd").mkdir()  # killed before deleting the old
    live = tmp_path / f".m{atomic.TMP_TAG}{os.getppid()}-beef"  # a save running elsewhere
    live.mkdir()
    io.load(d)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])


def test_atomic_json_writer(tmp_path):
    p = atomic.write_json(tmp_path / "r" / "x.json", {"a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2]}
    with pytest.raises(TypeError):
        atomic.write_json(p, {"a": object()})
    assert json.loads(p.read_text()) == {"a": [1, 2]}  # untouched by the failed write
    assert [q.name for q in p.parent.iterdir()] == ["x.json"]


@pytest.mark.slow
def test_kill9_during_saves_never_corrupts():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from save_crash import run
    finally:
        sys.path.pop(0)
    res = run(6, seed=3)
    assert res["saves"] == 6 and res["corrupted"] == 0 and res["leftovers"] == 0
    assert res["old"] + res["new"] == 6
    assert {t["fmt"] for t in res["trials"]} == {"netfold", "hf"}


# ------------------------------------------------------------------- any head count saves
def _fold64(model, ratio: float, reports: list | None = None):
    model = model.double().eval()
    report = netfold.fold(model, netfold.FoldConfig(ratio=ratio))
    if reports is not None:
        reports.append(report)
    return model


SHAPES = {
    # Llama-3.2-1B: hidden 2048 = 32 heads x 64, 8 KV heads, tied embeddings
    "llama-3.2-1b": dict(
        cls="Llama",
        hidden_size=128,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=4,
        intermediate_size=192,
        tie_word_embeddings=True,
    ),
    # Qwen2.5-0.5B: hidden 896 = 14 heads x 64, 2 KV heads, q/k/v biases
    "qwen2.5-0.5b": dict(
        cls="Qwen2",
        hidden_size=56,
        num_attention_heads=14,
        num_key_value_heads=2,
        head_dim=4,
        intermediate_size=96,
        tie_word_embeddings=True,
    ),
}


def _shaped(name: str):
    import transformers

    kw = dict(SHAPES[name])
    cls = kw.pop("cls")
    cfg = getattr(transformers, f"{cls}Config")(num_hidden_layers=2, vocab_size=64, **kw)
    torch.manual_seed(0)
    return getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_folded_heads_not_dividing_hidden_save_and_reload_exactly(tmp_path, name):
    model = _fold64(_shaped(name), 0.25)
    heads = model.config.num_attention_heads
    assert heads < SHAPES[name]["num_attention_heads"]
    assert model.config.hidden_size % heads != 0  # the case transformers may refuse
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        d = netfold.save(model, tmp_path / "f")
    note = llama.config_extension(d)
    extension = [w for w in caught if issubclass(w.category, llama.ConfigExtensionWarning)]
    assert (note is None) == (not extension)
    if llama.config_error(model.config) is not None:
        # refused as stock fields: saved through the extension, stock fields unfolded
        assert note and "netfold_layer_widths" in note
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["num_attention_heads"] == SHAPES[name]["num_attention_heads"]
        assert all(w["num_attention_heads"] == heads for w in cfg["netfold_layer_widths"])
        with pytest.raises(Exception):  # noqa: B017 - transformers' own refusal, any type
            model.save_pretrained(tmp_path / "stock")
    again = netfold.load(d)
    assert again.dtype == torch.float64
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model(ids).logits, again(ids).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-10)
        # negative control: one perturbed weight fails the same check
        again.model.layers[1].self_attn.o_proj.weight[0, 0] += 1e-3
        with pytest.raises(AssertionError):
            torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=1e-10)


def test_llama_fallback_is_chosen_by_validation(tmp_path):
    """Tiny Llama (hidden 64, 8 heads, 2 KV) at ratio 0.25 -> 6 heads: refused as stock
    fields, saved via the extension; at ratio 0.5 -> 4 heads it divides and stays stock.
    The fold's Report says so before any save."""
    reports: list = []
    m6 = _fold64(
        _llama(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=96,
            num_hidden_layers=2,
        ),
        0.25,
        reports,
    )
    assert m6.config.num_attention_heads == 6
    assert reports[0].extra["save_format"] == "netfold extension"
    assert any("netfold_layer_widths" in w for w in reports[0].warnings)
    assert "hidden size" in (llama.config_error(m6.config) or "")
    with pytest.warns(llama.ConfigExtensionWarning):
        llama.save_pretrained(m6, tmp_path / "six")
    m4 = _fold64(
        _llama(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=8,
            intermediate_size=96,
            num_hidden_layers=2,
        ),
        0.5,
        reports,
    )
    assert reports[1].extra["save_format"] == "stock config" and not reports[1].warnings
    assert m4.config.num_attention_heads == 4 and llama.config_error(m4.config) is None
    llama.save_pretrained(m4, tmp_path / "four")
    assert llama.config_extension(tmp_path / "four") is None
    assert json.loads((tmp_path / "four" / "config.json").read_text())["num_attention_heads"] == 4


# -------------------------------------------------------------------- GGUF-loaded models
@pytest.mark.real
@pytest.mark.slow
def test_gguf_loaded_model_folds_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    try:
        gguf = hub.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    assert model.hf_quantizer is not None  # the case that used to refuse to save
    netfold.fold(model, netfold.FoldConfig(ratio=0.1))
    d = netfold.save(model, tmp_path / "smol")
    assert model.hf_quantizer is not None  # the user's model is left as it was
    saved = load_file(str(d / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}
    again = netfold.load(d)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = model(ids).logits, again(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    with torch.no_grad():  # negative control: a perturbed reload fails the same check
        again.model.layers[0].mlp.down_proj.weight[0, 0] += 0.5
        with pytest.raises(AssertionError):
            torch.testing.assert_close(again(ids).logits, ref, rtol=0, atol=1e-4)
