"""netfold.merge: model folding across several networks, weight matching, ZipIt! and averaging.

Exact paths in float64 with negative controls: a channel-permuted copy is recovered exactly by
fold and weight matching (plain averaging fails), a model merged with itself is unchanged,
keeping every channel (width = number of models, or ZipIt! with zip_layers=0) is the ensemble.

Run: PYTHONPATH=$PWD/src OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_merge.py
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import netfold
import netfold.cli as cli
from netfold import MergeConfig, merge
from netfold.fold.deep_inversion import synthesize
from netfold.graph.trace import find_groups
from netfold.io import build
from netfold.merge import synthesize_merge_batch
from netfold.merge.matching import lap_labels, zipit_labels
from netfold.models import MODELS

METHODS = ("fold", "weight-matching", "zipit", "average")
X_CNN = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
X_MLP = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


class TinyRes(nn.Module):
    """Stem, one residual block with a 1x1 projection shortcut (8 -> 12 channels), classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.proj = nn.Conv2d(8, 12, 1, bias=False)
        self.bnp = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(h)) + self.bnp(self.proj(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _random_stats(m: nn.Module, seed: int) -> nn.Module:
    """Non-trivial BatchNorm parameters and statistics, so channels differ in every feature."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                n = mod.num_features
                mod.running_mean.copy_(torch.randn(n, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(n, generator=g))
                mod.weight.copy_(0.5 + torch.rand(n, generator=g))
                mod.bias.copy_(torch.randn(n, generator=g))
    return m


def make(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    if kind == "cnn":
        m = MODELS["small_cnn"](width=0.25)
    elif kind == "res":
        m = TinyRes()
    else:
        m = MODELS["mlp"](hidden=(16, 8), image_size=4)
    m = _random_stats(m.double().eval(), seed + 100)
    return m, (X_MLP if kind == "mlp" else X_CNN)


def permuted_copy(model: nn.Module, x: torch.Tensor, seed: int) -> nn.Module:
    """The same function with the channels of every foldable group randomly permuted.

    Written with plain indexing, independently of netfold.merge.
    """
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for grp in find_groups(model, x):
            if not grp.foldable:
                continue
            n = grp.size
            perm = torch.randperm(n, generator=g)
            while torch.equal(perm, torch.arange(n)):
                perm = torch.randperm(n, generator=g)
            for name in grp.producers + grp.channel_ops:
                mod = out.get_submodule(name)
                for t in ("weight", "bias", "running_mean", "running_var"):
                    v = getattr(mod, t, None)
                    if isinstance(v, torch.Tensor) and v.shape[0] == n:
                        v.copy_(v[perm])
            for c in grp.consumers:
                w = out.get_submodule(c.module).weight
                cols = w.reshape(w.shape[0], -1, *w.shape[2:])
                lo = c.offset * c.repeat
                blk = cols[:, lo : lo + n * c.repeat].reshape(w.shape[0], n, c.repeat, *w.shape[2:])
                cols[:, lo : lo + n * c.repeat] = blk[:, perm].reshape(
                    w.shape[0], n * c.repeat, *w.shape[2:]
                )
    return out


def snapshot(models: list[nn.Module]) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def assert_unchanged(models: list[nn.Module], before: list[dict[str, torch.Tensor]]) -> None:
    for m, sd in zip(models, before):
        now = m.state_dict()
        assert now.keys() == sd.keys()
        for k, v in sd.items():
            torch.testing.assert_close(now[k], v, rtol=0, atol=0, equal_nan=True, msg=k)
        assert not m.training


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max())


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["cnn", "res", "mlp"])
@pytest.mark.parametrize("method", ["fold", "weight-matching", "zipit"])
def test_permuted_copy_is_recovered_exactly(kind, method):
    a, x = make(kind, 0)
    b = permuted_copy(a, x, seed=7)
    assert max_err(a(x), b(x)) < 1e-12  # the copy computes the same function
    merged, report = merge([a, b], MergeConfig(method=method), example_inputs=x)
    with torch.no_grad():
        assert max_err(merged(x), a(x)) < 1e-10  # measured ~4e-16
    assert report.extra["cross_model_fraction"] == 1.0  # every merged channel is a pair


@pytest.mark.parametrize("method", ["fold", "weight-matching"])
def test_first_pass_alone_recovers_a_permuted_copy(method):
    """The first pass uses only features already comparable across models (graph order):
    enough for an exact copy without any coordinate descent."""
    a, x = make("res", 0)
    with torch.no_grad():  # consumer columns dominate: unaligned, they would mislead the match
        a.c2.weight *= 50
        a.fc.weight *= 50
    b = permuted_copy(a, x, seed=5)
    merged, report = merge([a, b], MergeConfig(method=method, max_passes=1), example_inputs=x)
    assert report.extra["passes"] == 1
    assert max_err(merged(x), a(x)) < 1e-10


@pytest.mark.parametrize("kind", ["cnn", "res", "mlp"])
def test_average_of_permuted_copy_fails(kind):
    """Negative control: the same pair without alignment is far from the original."""
    a, x = make(kind, 0)
    b = permuted_copy(a, x, seed=7)
    merged, _ = merge([a, b], MergeConfig(method="average"), example_inputs=x)
    with torch.no_grad():
        assert max_err(merged(x), a(x)) > 1e-2


@pytest.mark.parametrize("kind", ["cnn", "mlp"])
@pytest.mark.parametrize("method", METHODS)
def test_merge_with_itself_is_identity(kind, method):
    a, x = make(kind, 3)
    merged, _ = merge([a, copy.deepcopy(a)], MergeConfig(method=method), example_inputs=x)
    sd = a.state_dict()
    for k, v in merged.state_dict().items():
        assert v.shape == sd[k].shape, k
        if v.is_floating_point():
            torch.testing.assert_close(v, sd[k], atol=1e-12, rtol=0)
    with torch.no_grad():
        assert max_err(merged(x), a(x)) < 1e-10


def test_keeping_every_channel_is_the_ensemble():
    """width = M (fold) or zip_layers=0 (ZipIt!) keeps both models side by side: the mean logits."""
    a, x = make("res", 0)
    b, _ = make("res", 1)
    with torch.no_grad():
        ens = (a(x) + b(x)) / 2
        for cfg in (
            MergeConfig(method="fold", width=2.0),
            MergeConfig(method="zipit", zip_layers=0),
        ):
            merged, report = merge([a, b], cfg, example_inputs=x)
            assert max_err(merged(x), ens) < 1e-10
            assert report.params_after > report.params_before
        # negative control: a full merge of two different models is not the ensemble
        merged, _ = merge([a, b], MergeConfig(method="zipit"), example_inputs=x)
        assert max_err(merged(x), ens) > 1e-2


def test_partial_zipping_keeps_later_groups_apart():
    a, x = make("cnn", 0)
    b, _ = make("cnn", 1)
    widths = {g.name: g.size for g in find_groups(a, x) if g.foldable}
    merged, report = merge([a, b], MergeConfig(method="zipit", zip_layers=2), example_inputs=x)
    zipped = [g.name for g in report.groups]
    assert zipped == list(widths)[:2]
    assert report.extra["kept_apart"] == list(widths)[2:]
    assert merged.conv3.out_channels == 2 * widths["conv3"]
    assert merged.fc.in_features == 2 * widths["conv3"]
    assert merged.conv1.out_channels == widths["conv1"]
    assert merged(x).shape == (6, 10)
    # identical models: the zipped prefix is exact, the tails are two equal copies
    same, _ = merge(
        [a, copy.deepcopy(a)], MergeConfig(method="zipit", zip_layers=2), example_inputs=x
    )
    with torch.no_grad():
        assert max_err(same(x), a(x)) < 1e-10


@pytest.mark.parametrize("method", METHODS)
def test_three_models(method):
    models = [make("cnn", s)[0] for s in range(3)]
    before = snapshot(models)
    merged, report = merge(models, MergeConfig(method=method), example_inputs=X_CNN)
    assert_unchanged(models, before)
    assert merged(X_CNN).shape == (6, 10)
    assert report.params_after == report.params_before
    assert report.extra["models"] == 3
    for g in report.groups:
        assert g.width_after == g.width_before
        assert len(g.labels) == 3 * g.width_before
        assert sorted(set(g.labels)) == list(range(g.width_after))
    if method == "weight-matching":  # one channel of every model per merged channel
        for g in report.groups:
            lab = torch.tensor(g.labels).reshape(3, -1)
            for row in lab:
                assert sorted(row.tolist()) == list(range(g.width_before))


def test_three_permuted_copies_fold_exactly():
    a, x = make("cnn", 0)
    models = [a, permuted_copy(a, x, 1), permuted_copy(a, x, 2)]
    for method in ("fold", "weight-matching"):
        merged, _ = merge(models, MergeConfig(method=method), example_inputs=x)
        with torch.no_grad():
            assert max_err(merged(x), a(x)) < 1e-10


def test_fold_then_compress_width():
    a, x = make("cnn", 0)
    b, _ = make("cnn", 1)
    merged, report = merge([a, b], MergeConfig(method="fold", width=0.5), example_inputs=x)
    for g in report.groups:
        assert g.width_after == round(0.5 * g.width_before)
    assert report.params_after < 0.35 * report.params_before  # 2,886 of 10,946
    assert merged(x).shape == (6, 10)
    assert torch.isfinite(merged(x)).all()


def test_fold_duplicates_within_one_model_merge_exactly():
    """Within-model merging (what [P I] forbids): a model whose channels come in duplicate
    pairs, merged with itself at half width, is exact for fold; weight matching cannot shrink."""
    torch.manual_seed(0)
    a = MODELS["mlp"](hidden=(16, 8), image_size=4).double().eval()
    with torch.no_grad():  # each hidden layer: channels h..2h-1 duplicate 0..h-1, readers split
        for prod, cons, h in ((1, 3, 8), (3, 5, 4)):
            a[prod].weight[h:] = a[prod].weight[:h]
            a[prod].bias[h:] = a[prod].bias[:h]
            a[cons].weight[:, :h] *= 0.5
            a[cons].weight[:, h:] = a[cons].weight[:, :h]
    merged, report = merge([a, copy.deepcopy(a)], MergeConfig(width=0.5), example_inputs=X_MLP)
    assert [g.width_after for g in report.groups] == [8, 4]
    assert max_err(merged(X_MLP), a(X_MLP)) < 1e-10
    assert report.params_after < 0.52 * report.params_before
    # negative control: the same fold without the duplicates loses the function
    b, _ = make("mlp", 0)
    merged, _ = merge([b, copy.deepcopy(b)], MergeConfig(width=0.5), example_inputs=X_MLP)
    assert max_err(merged(X_MLP), b(X_MLP)) > 1e-2


def test_determinism():
    a, x = make("cnn", 0)
    b, _ = make("cnn", 1)
    for method in ("fold", "zipit", "weight-matching"):
        m1, r1 = merge([a, b], MergeConfig(method=method, seed=3), example_inputs=x)
        m2, r2 = merge([a, b], MergeConfig(method=method, seed=3), example_inputs=x)
        assert [g.labels for g in r1.groups] == [g.labels for g in r2.groups]
        for (k, v), w in zip(m1.state_dict().items(), m2.state_dict().values()):
            assert torch.equal(v, w), k


# ----------------------------------------------------------------------------- repair
def test_repair_data_mlp_self_merge_stays_exact_and_reestimates_bn():
    a, x = make("mlp", 0)
    data = torch.randn(64, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    merged, _ = merge(
        [a, copy.deepcopy(a)], MergeConfig(repair="data"), example_inputs=x, data=data
    )
    with torch.no_grad():
        assert max_err(merged(x), a(x)) < 1e-10  # REPAIR targets equal the members' stats

    c, x = make("cnn", 0)
    d, _ = make("cnn", 1)
    data = torch.randn(
        16, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5)
    )
    merged, _ = merge([c, d], MergeConfig(repair="data"), example_inputs=x, data=data)
    with torch.no_grad():
        y = merged.conv1(data)
    torch.testing.assert_close(merged.bn1.running_mean, y.mean((0, 2, 3)), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        merged.bn1.running_var, y.var((0, 2, 3), unbiased=True), atol=1e-10, rtol=1e-8
    )
    plain, _ = merge([c, d], MergeConfig(), example_inputs=x)
    assert max_err(plain.bn1.running_mean, y.mean((0, 2, 3))) > 1e-2  # negative control


def test_repair_dir_reestimates_bn_from_synthetic_batch():
    a, x = make("cnn", 0)
    b, _ = make("cnn", 1)
    di = netfold.DeepInversionConfig(batch_size=8, steps=2, seed=0)
    plain, _ = merge([a, b], MergeConfig(), example_inputs=x)
    merged, _ = merge([a, b], MergeConfig(repair="dir", deep_inversion=di), example_inputs=x)
    assert torch.isfinite(merged(x)).all()
    assert max_err(merged.bn1.running_mean, plain.bn1.running_mean) > 1e-3
    torch.testing.assert_close(merged.conv1.weight, plain.conv1.weight, atol=0, rtol=0)


def test_zipit_with_data_uses_activation_correlations():
    a, x = make("cnn", 0)
    b = permuted_copy(a, x, 9)
    data = torch.randn(
        8, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)
    )
    merged, report = merge([a, b], MergeConfig(method="zipit"), example_inputs=x, data=data)
    assert report.extra["features"] == "activations" and not report.warnings
    with torch.no_grad():
        assert max_err(merged(x), a(x)) < 1e-10
    _, report = merge([a, b], MergeConfig(method="zipit"), example_inputs=x)
    assert report.extra["features"] == "weights"
    # on two different models the two similarity measures pair channels differently
    c, _ = make("cnn", 1)
    _, r_act = merge([a, c], MergeConfig(method="zipit"), example_inputs=x, data=data)
    _, r_w = merge([a, c], MergeConfig(method="zipit"), example_inputs=x)
    assert [g.labels for g in r_act.groups] != [g.labels for g in r_w.groups]
    assert any("without data" in w for w in report.warnings)


# ----------------------------------------------------------------------------- matching units
def test_lap_labels_match_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 5
    F1, F2 = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)
    labels, score = lap_labels(torch.cat([F1, F2]).double(), n)
    S = F1.double() @ F2.double().t()
    best = max(
        itertools.permutations(range(n)), key=lambda p: sum(float(S[i, p[i]]) for i in range(n))
    )
    assert math.isclose(score, sum(float(S[i, best[i]]) for i in range(n)), rel_tol=1e-12)
    assert labels[n:].tolist() == [best.index(j) for j in range(n)]


def test_zipit_greedy_pairs_within_and_across_models():
    # channels 0, 1 of model A are each other's closest; 2 (A) pairs with 4 (B); 3 with 5 (B)
    S = torch.full((6, 6), -1.0, dtype=torch.float64)
    for i, j, v in [(0, 1, 0.9), (2, 4, 0.8), (3, 5, 0.7), (0, 3, 0.6), (4, 5, 0.5)]:
        S[i, j] = S[j, i] = v
    labels, mean_sim = zipit_labels(S, 3, 2)
    assert labels.tolist() == [0, 0, 1, 2, 1, 2]
    assert math.isclose(mean_sim, 0.8, rel_tol=1e-12)
    # the size cap (two models: pairs) blocks chaining 0-1-2; 2 then pairs with the leftover 5
    S = torch.full((6, 6), -1.0, dtype=torch.float64)
    for i, j, v in [(0, 1, 0.9), (1, 2, 0.85), (3, 4, 0.8), (4, 5, 0.7)]:
        S[i, j] = S[j, i] = v
    assert zipit_labels(S, 3, 2)[0].tolist() == [0, 0, 1, 2, 2, 1]


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    a, _ = make("cnn", 0)
    wide = _random_stats(MODELS["small_cnn"](width=0.5).double().eval(), 1)
    mlp, _ = make("mlp", 0)
    nan = copy.deepcopy(a)
    with torch.no_grad():
        nan.block.conv1.weight[0, 0, 0, 0] = float("nan")
    f32 = copy.deepcopy(a).float()
    return [
        ([a, mlp], {}, "models\\[1\\] is a Sequential"),
        ([a, wide], {}, "models\\[1\\] tensor 'conv1.weight' has shape"),
        ([a], {}, "at least two models"),
        ([a, nan], {}, "models\\[1\\] tensor 'block.conv1.weight' contains NaN"),
        ([a, f32], {}, "models\\[1\\] tensor 'conv1.weight' is torch.float32"),
        ([a, copy.deepcopy(a)], {"config": MergeConfig(width=3.0)}, "width must be at most"),
        ([a, copy.deepcopy(a)], {"config": MergeConfig(repair="data")}, "needs calibration"),
        (
            [a, copy.deepcopy(a)],
            {"data": torch.randn(4, 1, 16, 16, dtype=torch.float64)},
            "would ignore it",
        ),
        (
            [a, copy.deepcopy(a)],
            {"config": MergeConfig(repair="data"), "data": torch.randn(4, 3, 16, 16).double()},
            "data must be",
        ),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_input_is_refused_and_changes_nothing(case):
    models, kw, match = _bad_cases()[case]
    before = snapshot(models)
    with pytest.raises(ValueError, match=match):
        merge(models, kw.pop("config", MergeConfig()), example_inputs=X_CNN, **kw)
    assert_unchanged(models, before)


class Flagged(nn.Module):
    """Same tensors whatever ``add`` is; ``add`` joins the two hidden layers into one group."""

    def __init__(self, add: bool) -> None:
        super().__init__()
        self.add = add
        self.a, self.b, self.c = nn.Linear(16, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x.flatten(1)))
        h2 = self.b(h)
        return self.c(torch.relu(h2 + h if self.add else h2))


def test_same_tensors_other_groups_is_refused():
    models = [Flagged(False).double().eval(), Flagged(True).double().eval()]
    before = snapshot(models)
    with pytest.raises(ValueError, match="models\\[1\\] has other channel groups"):
        merge(models, example_inputs=X_MLP)
    assert_unchanged(models, before)


def test_bad_types_and_configs():
    a, x = make("cnn", 0)
    with pytest.raises(TypeError, match="models must be a list"):
        merge(a, example_inputs=x)
    with pytest.raises(TypeError, match="models\\[1\\] must be a torch.nn.Module"):
        merge([a, "b"], example_inputs=x)
    with pytest.raises(TypeError, match="config must be a netfold.MergeConfig"):
        merge([a, a], {"method": "fold"}, example_inputs=x)
    for kw, match in [
        ({"method": "knn"}, "unknown method"),
        ({"repair": "ar"}, "unknown repair"),
        ({"width": 0.0}, "width must be"),
        ({"width": float("nan")}, "width must be"),
        ({"method": "weight-matching", "width": 0.5}, "width must be 1.0"),
        ({"method": "average", "width": 2.0}, "width must be 1.0"),
        ({"zip_layers": 1}, "zip_layers is the partial zipping option"),
        ({"method": "zipit", "zip_layers": -1}, "zip_layers must be >= 0"),
        ({"max_passes": 0}, "max_passes must be"),
    ]:
        with pytest.raises(ValueError, match=match):
            MergeConfig(**kw)


def test_repair_dir_needs_batchnorm():
    a, x = make("mlp", 0)
    with pytest.raises(ValueError, match="needs BatchNorm"):
        merge([a, copy.deepcopy(a)], MergeConfig(repair="dir"), example_inputs=x)


def test_config_json_round_trip():
    cfg = MergeConfig(
        method="zipit", repair="dir", width=1.5, seed=4, zip_layers=2, outputs="concat",
        deep_inversion=netfold.DeepInversionConfig(steps=3),
    )  # fmt: skip
    assert MergeConfig.from_json(cfg.to_json()) == cfg


# ----------------------------------------------------------------------------- CLI
@pytest.fixture
def saved_pair(tmp_path):
    paths = []
    for s in range(2):
        torch.manual_seed(s)
        m = build("netfold:small_cnn", {"width": 0.25}).eval()
        netfold.save(m, tmp_path / f"m{s}")
        paths.append(tmp_path / f"m{s}")
    return paths


def test_cli_merge_saves_the_api_result(saved_pair, tmp_path, capsys):
    out = tmp_path / "merged"
    rc = cli.main(
        ["merge", *map(str, saved_pair), "--method", "fold", "--width", "0.5", "--out", str(out)]
    )
    assert rc == 0, capsys.readouterr().err
    loaded = netfold.load(out)
    models = [netfold.load(p) for p in saved_pair]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    want, _ = merge(models, MergeConfig(method="fold", width=0.5), example_inputs=x)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want(x), atol=1e-5, rtol=1e-5)
    assert loaded.conv3.out_channels == 16


def test_cli_merge_concat_outputs(saved_pair, tmp_path, capsys):
    """--outputs concat keeps both heads: the saved model gives the API's (N, 2 * 10) output."""
    out = tmp_path / "merged"
    argv = ["merge", *map(str, saved_pair), "--outputs", "concat", "--out", str(out)]
    assert cli.main(argv) == 0, capsys.readouterr().err
    loaded = netfold.load(out)
    models = [netfold.load(p) for p in saved_pair]
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    want, _ = merge(models, MergeConfig(outputs="concat"), example_inputs=x)
    with torch.no_grad():
        got = loaded(x)
        torch.testing.assert_close(got, want(x), atol=1e-5, rtol=1e-5)
    assert got.shape == (2, 20)  # negative control: the default averages to (2, 10)


def test_cli_merge_errors(saved_pair, tmp_path, capsys):
    a, b = map(str, saved_pair)
    cases = [
        (["merge", a, "--out", str(tmp_path / "o1")], "at least two models"),
        (["merge", a, str(tmp_path / "missing"), "--out", str(tmp_path / "o2")], "missing"),
        (["merge", a, b, "--method", "weight-matching", "--width", "0.5"], "width must be 1.0"),
        (["merge", a, b, "--repair", "data"], "--data"),
    ]
    for argv, msg in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and msg in err, err
        assert len([ln for ln in err.splitlines() if ln.strip()]) == 1
    assert cli.main(["merge", a, b, "--method", "nope"]) == 2
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------- separate heads
def other_head(model: nn.Module, seed: int) -> nn.Module:
    """``model`` with only its output layer re-drawn: same trunk, a head for another task."""
    out = copy.deepcopy(model)
    head = [m for m in out.modules() if isinstance(m, nn.Linear)][-1]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g, dtype=head.weight.dtype))
        head.bias.copy_(torch.randn(head.bias.shape, generator=g, dtype=head.bias.dtype))
    return out


@pytest.mark.parametrize("kind", ["cnn", "res", "mlp"])
@pytest.mark.parametrize("method", METHODS)
def test_concat_outputs_of_one_trunk_are_both_heads_exactly(kind, method):
    a, x = make(kind, 0)
    b = other_head(a, seed=5)
    if method != "average":
        b = permuted_copy(b, x, seed=7)  # the trunk must be re-aligned, not just averaged
    before = snapshot([a, b])
    merged, report = merge([a, b], MergeConfig(method=method, outputs="concat"), example_inputs=x)
    assert_unchanged([a, b], before)
    with torch.no_grad():
        ya, yb, y = a(x), b(x), merged(x)
    n = ya.shape[1]
    assert y.shape == (x.shape[0], 2 * n) and report.extra["outputs"] == "concat"
    assert max_err(y[:, :n], ya) < 1e-10  # measured ~1e-15
    assert max_err(y[:, n:], yb) < 1e-10
    # Negative control: averaged outputs mix the two heads.
    avg, _ = merge([a, b], MergeConfig(method=method), example_inputs=x)
    with torch.no_grad():
        assert avg(x).shape == ya.shape and max_err(avg(x), ya) > 1e-2


def test_concat_outputs_with_repair_data_on_one_trunk_stays_exact():
    # An MLP (no BatchNorm): REPAIR gives merged producers an affine correction; with one shared
    # trunk every correction is the identity and the concatenated heads stay exact.
    a, x = make("mlp", 0)
    b = other_head(a, seed=3)
    data = torch.randn(64, *x.shape[1:], dtype=x.dtype, generator=torch.Generator().manual_seed(9))
    cfg = MergeConfig(method="fold", repair="data", outputs="concat")
    merged, _ = merge([a, b], cfg, example_inputs=x, data=data)
    with torch.no_grad():
        y = merged(x)
        assert max_err(y, torch.cat([a(x), b(x)], 1)) < 1e-8  # measured ~1e-14


def test_concat_outputs_refuses_a_normalised_output():
    torch.manual_seed(0)
    m = (
        nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4), nn.BatchNorm1d(4))
        .double()
        .eval()
    )
    other = copy.deepcopy(m)
    before = snapshot([m, other])
    with pytest.raises(ValueError, match="outputs='concat' needs every model output"):
        merge([m, other], MergeConfig(outputs="concat"), example_inputs=X_MLP)
    assert_unchanged([m, other], before)
    with pytest.raises(ValueError, match="unknown outputs"):
        MergeConfig(outputs="stack")


def test_dir_batch_takes_an_equal_share_from_each_model():
    a, x = make("cnn", 0)
    b, _ = make("cnn", 1)
    di = netfold.DeepInversionConfig(batch_size=7, steps=2, seed=3)
    batch = synthesize_merge_batch([a, b], tuple(x.shape[1:]), di)
    assert batch.shape == (7, *x.shape[1:])
    part_a = synthesize(
        a, tuple(x.shape[1:]), netfold.DeepInversionConfig(batch_size=4, steps=2, seed=3)
    )
    part_b = synthesize(
        b, tuple(x.shape[1:]), netfold.DeepInversionConfig(batch_size=3, steps=2, seed=4)
    )
    torch.testing.assert_close(batch, torch.cat([part_a, part_b]), atol=0, rtol=0)
    # Negative control: a batch from the first model alone differs.
    only_a = synthesize(
        a, tuple(x.shape[1:]), netfold.DeepInversionConfig(batch_size=7, steps=2, seed=3)
    )
    assert max_err(batch[4:], only_a[4:]) > 1e-3
    # repair="dir" is REPAIR on that batch.
    cfg = MergeConfig(repair="dir", deep_inversion=di)
    by_dir, _ = merge([a, b], cfg, example_inputs=x)
    by_data, _ = merge([a, b], MergeConfig(repair="data"), example_inputs=x, data=batch)
    for (k, v), (k2, v2) in zip(by_dir.state_dict().items(), by_data.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(v, v2, atol=0, rtol=0, msg=k)
    with pytest.raises(ValueError, match="at least 2 inputs per model"):
        merge(
            [a, b],
            MergeConfig(repair="dir", deep_inversion=netfold.DeepInversionConfig(batch_size=3)),
            example_inputs=x,
        )
