"""OOD scores: the Mahalanobis distance under a Ledoit-Wolf-shrunk covariance, the content check, the threshold."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import blobs
from vlrouter.core.errors import CheckpointError
from vlrouter.core.layout import LAYOUT_DIM
from vlrouter.core.ood import MAX_LAYOUTS, MAX_RANK, OODModel, auroc, calibrate, fit_ood, keep_layouts


def _data(n_per_class, dim, seed=1):
    """Anisotropic clusters (every dimension its own spread), so the shrinkage is neither 0 nor 1."""
    x, y = blobs(n_per_class, dim=dim, seed=seed)
    return x * torch.linspace(0.2, 3, dim), y


def _dense_distance(x, y, queries, num_labels):
    """Reference: min over classes of z^T Sigma^-1 z / D, Sigma = (1 - a) S + a tr(S)/D I, dense, with sklearn's a."""
    from sklearn.covariance import ledoit_wolf_shrinkage

    xd = x.double()
    means = torch.stack([xd[y == c].mean(0) for c in range(num_labels)])
    r = xd - means[y]
    n, d = r.shape
    s = r.T @ r / n
    a = float(ledoit_wolf_shrinkage(r.numpy(), assume_centered=True))
    sigma = (1 - a) * s + a * float(s.trace()) / d * torch.eye(d, dtype=torch.float64)
    inv = torch.linalg.inv(sigma)
    q = queries.double()
    dist = torch.stack([((q - m) @ inv * (q - m)).sum(1) for m in means]).amin(0)
    return dist / d, a


@pytest.mark.parametrize("n_per_class, dim", [((20, 20, 20), 4), ((5, 5, 5), 30)], ids=["N>D", "D>N"])
def test_distance_is_the_mahalanobis_distance_under_the_ledoit_wolf_shrunk_covariance(n_per_class, dim):
    x, y = _data(n_per_class, dim)
    model = fit_ood(x, y, 3)
    queries = torch.cat([x[:5], x[:5] + 4.0, torch.randn(5, dim, generator=torch.Generator().manual_seed(3)) * 6])
    ref, shrinkage = _dense_distance(x, y, queries, 3)
    assert 0.05 < shrinkage < 0.95  # a real mix of the sample covariance and the identity
    assert model.shrinkage == pytest.approx(shrinkage, rel=1e-9)
    torch.testing.assert_close(model.distance(queries), ref, rtol=1e-4, atol=1e-8)


def test_with_few_samples_the_shrinkage_stops_at_the_identity():
    x, y = blobs((6, 6, 6), dim=4, seed=1)
    model = fit_ood(x, y, 3)
    ref, shrinkage = _dense_distance(x, y, x + 1.0, 3)
    assert model.shrinkage == shrinkage == 1.0  # never more than all the way to the scaled identity
    torch.testing.assert_close(model.distance(x + 1.0), ref, rtol=1e-6, atol=1e-9)


def test_isotropic_residuals_make_the_distance_euclidean():
    """Residuals whose covariance is already a multiple of the identity: full shrinkage, |x - mean|^2 / (mu D)."""
    square = torch.tensor([[1.0, 0], [-1, 0], [0, 1], [0, -1]])  # covariance 0.5 I about its mean
    x = torch.cat([square, square + 10])
    y = torch.tensor([0] * 4 + [1] * 4)
    model = fit_ood(x, y, 2)
    assert model.shrinkage == 1.0
    q = torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 10.0]])
    expected = torch.tensor([0.0, 25.0, 1.0]) / (0.5 * 2)
    torch.testing.assert_close(model.distance(q), expected.double().clamp_min(1e-12 / 2), rtol=1e-9, atol=1e-9)


def test_many_samples_in_many_dimensions_keep_at_most_max_rank_directions():
    """The checkpoint stays small however much data there is: the rest of the covariance counts as isotropic."""
    x = torch.randn(MAX_RANK + 20, MAX_RANK + 10, generator=torch.Generator().manual_seed(0))
    y = torch.arange(len(x)) % 2
    model = fit_ood(x, y, 2)
    assert model.basis.shape == (MAX_RANK + 10, MAX_RANK) and model.meta()["rank"] == MAX_RANK
    assert bool(torch.isfinite(model.distance(x[:4])).all())


def _calibrated(content=True):
    x, y = _data((20, 20, 20), 6)
    vx, _ = _data((6, 6, 6), 6, seed=2)
    g = torch.Generator().manual_seed(4)
    tc, vc = (torch.rand(60, 8, generator=g) + 0.5, torch.rand(18, 8, generator=g) + 0.5) if content else (None, None)
    return calibrate(fit_ood(x, y, 3), vx, vc, tc), vx, vc


def test_the_threshold_leaves_the_quantile_of_validation_inputs_known_and_far_inputs_unknown():
    model, vx, vc = _calibrated()
    scores = model.score(vx, vc)
    assert float((scores <= model.threshold).double().mean()) == pytest.approx(0.95, abs=0.06)
    far = vx + 50.0
    assert bool((model.score(far, vc) > model.threshold).all())


def test_one_validation_sample_still_gives_a_finite_threshold_that_knows_it():
    x, y = _data((20, 20, 20), 6)
    model = calibrate(fit_ood(x, y, 3), x[:1], torch.ones(1, 8), None)
    assert model.far[1] == 1.0 and model.content[1] == 1.0  # no spread measurable from one sample: unit scale
    assert bool(model.score(x[:1], torch.ones(1, 8)) <= model.threshold)


@pytest.mark.parametrize("screen", ["blank", "noise"])
def test_a_screen_unlike_any_gui_is_unknown_even_close_to_the_data(screen):
    """Content is two-sided: a near-uniform screenshot and a far too busy one both score high."""
    model, vx, vc = _calibrated()
    odd = torch.full_like(vc, 1e-3) if screen == "blank" else vc * 40
    assert bool((model.score(vx, odd) > model.threshold).all())
    assert bool((model.score(vx, odd) > model.score(vx)).all())  # without the content view: distance only


@pytest.mark.parametrize("content", [True, False], ids=["with-content", "distance-only"])
def test_saved_statistics_score_exactly_like_the_fitted_model(content):
    """What router.json + head.safetensors hold (meta through JSON, tensors) gives the same scores."""
    model, vx, vc = _calibrated(content)
    meta = json.loads(json.dumps(model.meta()))
    assert (meta["content"] is not None) == content
    back = OODModel.from_saved(model.tensors(), meta)
    odd = None if vc is None else vc * 40
    torch.testing.assert_close(back.score(vx, odd), model.score(vx, odd))
    assert back.threshold == model.threshold and back.quantile == model.quantile


def test_statistics_saved_without_spreads_score_the_raw_log_distance():
    """A router.json from before the spreads were recorded: no far/content, so no rescaling at all."""
    model, vx, vc = _calibrated()
    meta = {k: v for k, v in model.meta().items() if k not in ("far", "content", "quantile", "shrinkage")}
    back = OODModel.from_saved(model.tensors(), meta)
    torch.testing.assert_close(back.score(vx, vc), model.distance(vx).log())
    assert back.quantile == 0.95 and back.shrinkage == 0.0


def test_incomplete_saved_statistics_name_the_fix():
    model, _, _ = _calibrated()
    tensors = model.tensors()
    del tensors["ood.basis"]
    with pytest.raises(CheckpointError, match=r"ood: the OOD statistics are incomplete \(missing \['ood.basis'\]\)"
                                              r".*router.ood: off"):
        OODModel.from_saved(tensors, model.meta())
    with pytest.raises(CheckpointError, match="missing meta"):
        OODModel.from_saved(model.tensors(), {"iso": 1.0})


def test_auroc_matches_sklearn_with_ties_and_is_nan_without_samples():
    from sklearn.metrics import roc_auc_score

    inside, outside = [0.1, 0.5, 0.5, 0.9, 1.2], [0.5, 1.0, 2.0, 0.05]
    expected = roc_auc_score([0] * len(inside) + [1] * len(outside), inside + outside)
    assert auroc(inside, outside) == pytest.approx(expected)
    assert auroc([0.0, 0.1], [1.0, 2.0]) == 1.0 and auroc([1.0, 2.0], [0.0, 0.1]) == 0.0
    assert auroc([], [1.0]) != auroc([], [1.0])  # nan


# ---- the layout distance ----------------------------------------------------------------------------------------

def _unit(x):
    return torch.nn.functional.normalize(x, dim=1)


def _layouts(n, seed, dim=LAYOUT_DIM):
    """Screens of three kinds: each kind a unit prototype plus a little per-screen variation."""
    g = torch.Generator().manual_seed(seed)
    protos = _unit(torch.rand(3, dim, generator=torch.Generator().manual_seed(99)))
    kind = torch.arange(n) % 3
    return _unit(protos[kind] + 0.05 * torch.rand(n, dim, generator=g)), kind


def _with_layouts():
    x, y = _data((20, 20, 20), 6)
    tl, _ = _layouts(60, seed=1)
    vx, _ = _data((6, 6, 6), 6, seed=2)
    vl, _ = _layouts(18, seed=2)
    model = calibrate(fit_ood(x, y, 3, layouts=tl), vx, val_layout=vl)
    return model, vx, vl


def test_a_familiar_looking_input_on_an_unseen_kind_of_screen_is_unknown():
    """Features typical, layout unlike every training screenshot: the layout distance alone flags it."""
    model, vx, vl = _with_layouts()
    assert model.layouts.shape == (60, LAYOUT_DIM) and model.layout is not None
    known = model.score(vx, layout=vl) <= model.threshold
    assert float(known.double().mean()) == pytest.approx(0.95, abs=0.06)
    unseen = _unit(torch.rand(18, LAYOUT_DIM, generator=torch.Generator().manual_seed(5)))
    assert bool((model.score(vx, layout=unseen) > model.threshold).all())
    assert bool((model.score(vx, layout=torch.zeros_like(vl)) > model.threshold).all())  # a screen without edges
    assert torch.equal(model.score(vx), model.score(vx, layout=None))  # not given: not counted


def test_with_layouts_the_content_score_is_left_out_and_blank_or_noise_screens_are_still_unknown():
    """The layout sees a blank screen (no edges) and noise (edges everywhere); the two-sided content score
    would only add the typical screens' spread to every score."""
    x, y = _data((20, 20, 20), 6)
    tl, _ = _layouts(60, seed=1)
    vx, _ = _data((6, 6, 6), 6, seed=2)
    vl, _ = _layouts(18, seed=2)
    g = torch.Generator().manual_seed(4)
    tc, vc = torch.rand(60, 8, generator=g) + 0.5, torch.rand(18, 8, generator=g) + 0.5
    model = calibrate(fit_ood(x, y, 3, layouts=tl), vx, vc, tc, val_layout=vl)
    assert model.content is None and model.layout is not None
    assert torch.equal(model.score(vx, vc, vl), model.score(vx, None, vl))
    noise = _unit(torch.ones(18, LAYOUT_DIM) + 0.01 * torch.rand(18, LAYOUT_DIM, generator=g))  # edges everywhere
    assert bool((model.score(vx, vc, noise) > model.threshold).all())
    assert bool((model.score(vx, vc, torch.zeros(18, LAYOUT_DIM)) > model.threshold).all())
    plain = calibrate(fit_ood(x, y, 3), vx, vc, tc, val_layout=vl)  # no training layouts: content it is
    assert plain.content is not None and plain.layout is None


def test_the_score_adds_up_the_evidence_of_every_count_beyond_typical():
    model, vx, vl = _with_layouts()
    content = torch.rand(18, 8, generator=torch.Generator().manual_seed(3)) + 0.5
    model.content = (0.5, 0.25)
    far = (model.distance(vx).log() - model.far[0]) / model.far[1]
    busy = ((content.double() ** 2).sum(1).log() - 0.5).abs() / 0.25
    apart = (model.layout_distance(vl).double() - model.layout[0]) / model.layout[1]
    expected = (far.clamp_min(0) ** 2 + busy ** 2 + apart.clamp_min(0) ** 2).sqrt()
    torch.testing.assert_close(model.score(vx, content, vl), expected)
    model.combine = "max"  # the rule of routers saved before the layout view
    torch.testing.assert_close(model.score(vx, content, vl), torch.stack([far, busy, apart]).amax(0))


def test_the_layout_spread_is_measured_on_new_screenshots_only():
    """Validation screenshots that are also training screenshots (one screen, several instructions) are at
    distance 0; the spread is measured without them."""
    x, y = _data((20, 20, 20), 6)
    tl, _ = _layouts(60, seed=1)
    vx, _ = _data((6, 6, 6), 6, seed=2)
    vl, _ = _layouts(18, seed=2)
    mixed = torch.cat([vl[:10], tl[:8]])
    model = calibrate(fit_ood(x, y, 3, layouts=tl), vx, val_layout=mixed)
    fresh = model.layout_distance(vl[:10]).double()
    assert model.layout == pytest.approx((float(fresh.mean()), float(fresh.std())))
    two_new = calibrate(fit_ood(x, y, 3, layouts=tl), vx[:10], val_layout=torch.cat([vl[:2], tl[:8]]))
    pair = model.layout_distance(vl[:2]).double()
    assert two_new.layout == pytest.approx((float(pair.mean()), float(pair.std())))  # two new ones are enough
    only_copies = calibrate(fit_ood(x, y, 3, layouts=tl), vx[:8], val_layout=tl[:8])
    assert only_copies.layout[0] == pytest.approx(0.0, abs=1e-6)  # nothing new to measure: all of them, not none


def test_kept_layouts_drop_repeats_and_share_the_limit_evenly_between_adapters():
    layouts, _ = _layouts(40, seed=4)
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    repeated = torch.cat([layouts, layouts[:5]])
    kept = keep_layouts(repeated, torch.cat([labels, labels[:5]]), 3)
    assert torch.equal(kept, layouts)  # every distinct one, in order, when they fit
    few = keep_layouts(layouts, labels, 3, limit=16)
    rows = {tuple(r.tolist()): i for i, r in enumerate(layouts)}
    picked = torch.tensor([rows[tuple(r.tolist())] for r in few])
    assert len(few) == 16 and len(set(picked.tolist())) == 16
    counts = labels[picked].bincount(minlength=3).tolist()
    assert counts == [6, 6, 4]  # the small adapter keeps all it has; the others share the rest evenly
    odd = keep_layouts(layouts, labels, 3, limit=15)
    assert labels[[rows[tuple(r.tolist())] for r in odd]].bincount(minlength=3).tolist() == [6, 5, 4]  # in turn
    assert keep_layouts(layouts[:0], labels[:0], 3).shape == (0, LAYOUT_DIM)
    assert torch.equal(keep_layouts(layouts, labels, 3, limit=16), few)  # seeded: the same draw every time
    assert not torch.equal(keep_layouts(layouts, labels, 3, limit=16, seed=1), few)
    assert MAX_LAYOUTS >= 4096


def test_the_nearest_layout_is_found_for_any_number_of_screens():
    model, _, _ = _with_layouts()
    many = _unit(torch.rand(600, LAYOUT_DIM, generator=torch.Generator().manual_seed(8)))  # more than one chunk
    expected = torch.cdist(many.half().double(), model.layouts.double()).amin(1)
    torch.testing.assert_close(model.layout_distance(many), expected)
    assert model.layout_distance(many[:0]).shape == (0,)


def test_saved_layouts_score_like_the_fitted_model_and_old_routers_keep_their_rule():
    model, vx, vl = _with_layouts()
    meta = json.loads(json.dumps(model.meta()))
    assert meta["combine"] == "norm" and meta["layout"] == list(model.layout)
    tensors = model.tensors()
    assert tensors["ood.layouts"].dtype == torch.float16
    back = OODModel.from_saved(tensors, meta)
    assert torch.equal(back.score(vx, layout=vl), model.score(vx, layout=vl))  # stored as fitted: float16
    old = {k: v for k, v in meta.items() if k not in ("combine", "layout")}
    legacy = OODModel.from_saved({k: v for k, v in tensors.items() if k != "ood.layouts"}, old)
    assert legacy.combine == "max" and legacy.layouts is None
    torch.testing.assert_close(legacy.score(vx, layout=vl), legacy.score(vx))


def test_a_router_whose_saved_layouts_do_not_fit_is_refused_with_the_fix(tmp_path):
    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.store import RouterMeta, read_router, save_router

    x, y = _data((20, 20, 20), 6)
    tl, _ = _layouts(60, seed=1, dim=LAYOUT_DIM - 2)  # not a layout of this version
    model = calibrate(fit_ood(x, y, 3, layouts=tl), x, val_layout=tl)
    shape = HeadShape(in_dim=6, num_labels=3)
    meta = RouterMeta(adapters=["a", "b", "c"], base_model="m", pooling="mean", layer=-1, hidden_size=6, head=shape)
    save_router(tmp_path / "r", build_head(shape), meta, ood=model)
    with pytest.raises(CheckpointError, match=r"ood: the OOD statistics do not fit the head.*ood.layouts"
                                              r".*router.ood: off"):
        read_router(tmp_path / "r")
    good = calibrate(fit_ood(x, y, 3, layouts=_layouts(60, seed=1)[0]), x[:9], val_layout=_layouts(9, seed=3)[0])
    save_router(tmp_path / "ok", build_head(shape), meta, ood=good)
    assert torch.equal(read_router(tmp_path / "ok").ood.layouts, good.layouts)


def test_the_model_names_the_screenshot_views_it_reads_so_the_engine_computes_no_others():
    with_layouts, _, _ = _with_layouts()
    assert with_layouts.screen_views == ("layout",) and with_layouts.meta()["method"] == "mahalanobis-shrunk+layout"
    content, _, _ = _calibrated()
    assert content.screen_views == ("image-std",) and content.meta()["method"] == "mahalanobis-shrunk+content"
    plain, _, _ = _calibrated(content=False)
    assert plain.screen_views == () and plain.meta()["method"] == "mahalanobis-shrunk"
