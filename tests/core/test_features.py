"""The feature cache: embed only what is missing, resume after interruption, never a pickle."""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import make_dataset
from vlrouter.core.data import read_adapter_dataset
from vlrouter.core.errors import ImageError
from vlrouter.core.features import FeatureCache, collate, embed_dataset, feature_key, prepare_shard, sample_keys
from vlrouter.core.images import open_image
from vlrouter.core.layout import LAYOUT_DIM
from vlrouter.core.views import CACHED_VIEWS


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    out = []
    for task in ("calendar", "provider-select"):
        path = make_dataset(root / task, task, 6)
        out += read_adapter_dataset(path, adapter=task)[0]
    return out


def test_collate_of_per_sample_outputs_equals_processing_the_batch(tiny_encoder, samples):
    batch = samples[:4]
    per_sample = prepare_shard(tiny_encoder.base_model, batch, processor=tiny_encoder.processor)
    together = tiny_encoder.prepare([open_image(s.image) for s in batch], [s.prompt for s in batch])
    merged = collate(per_sample, tiny_encoder.processor.tokenizer.pad_token_id)
    assert set(merged) == set(together)
    for k in together:
        assert torch.equal(merged[k], together[k]), k


LAST = [-1]  # the last layer only


def _mean(views: dict) -> torch.Tensor:
    (name,) = [n for n in views if n.startswith("mean@")]
    return views[name]


def test_embed_twice_embeds_nothing_the_second_time(tiny_encoder, samples, tmp_path):
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    views, stats = embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=5)
    n = tiny_encoder.num_layers
    assert set(views) == {f"{v}@{n}" for v in CACHED_VIEWS}
    feats = _mean(views)
    assert feats.shape == (len(samples), tiny_encoder.hidden_size) and feats.dtype == torch.float32
    assert stats["embedded_new"] == len(samples) and stats["reused_cached"] == 0
    # one safetensors file per sample at <root>/<encoder fp>/<key[:2]>/<key>.safetensors; no pickles
    files = sorted((tmp_path / "cache").rglob("*"))
    entries = [f for f in files if f.is_file()]
    assert len(entries) == len(samples) and all(f.suffix == ".safetensors" for f in entries)
    for f in entries:
        assert f.parent.parent.name == tiny_encoder.fingerprint() and f.parent.name == f.stem[:2]

    again, stats2 = embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=5)
    assert stats2["embedded_new"] == 0 and stats2["reused_cached"] == len(samples) and stats2["forwarded"] == 0
    assert all(torch.equal(again[k], views[k]) for k in views)
    # features match a plain forward of each sample (cache = what the engine would compute)
    direct = tiny_encoder.embed([open_image(samples[0].image)], [samples[0].prompt], LAST)
    for k in views:
        torch.testing.assert_close(views[k][0], direct[k][0], rtol=1e-4, atol=1e-5)


def test_a_layer_asked_for_later_re_embeds_and_keeps_the_views_already_cached(tiny_encoder, samples, tmp_path):
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    first, _ = embed_dataset(tiny_encoder, samples, cache, layers=[1], batch_size=6)
    both, stats = embed_dataset(tiny_encoder, samples, cache, layers=[1, -1], batch_size=6)
    assert stats["embedded_new"] == len(samples)  # layer -1 was not in the entries yet
    assert all(torch.equal(both[k], first[k]) for k in first)
    only_first, stats = embed_dataset(tiny_encoder, samples, cache, layers=[1], batch_size=6)
    assert stats["embedded_new"] == 0  # every entry now holds both layers
    last_only, stats = embed_dataset(tiny_encoder, samples, cache, layers=[-1], batch_size=6)
    assert stats["embedded_new"] == 0 and all(torch.equal(last_only[k], both[k]) for k in last_only)


def test_entries_from_before_the_layout_view_are_re_embedded_and_keep_their_views(tiny_encoder, samples, tmp_path):
    """A cache filled by an older vlrouter holds every hidden-state view but no ``layout``: those samples are
    embedded again once, the entry rewritten with the layout, and the views it had are unchanged."""
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    full, _ = embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=6)
    n = tiny_encoder.num_layers
    keys = sample_keys(tiny_encoder, samples)
    for k in keys[:3]:  # as an older version wrote them: no layout
        entry = cache.get_all(k)
        cache.path(k).unlink()
        cache.put(k, {name: t for name, t in entry.items() if not name.startswith("layout@")})
        assert f"layout@{n}" not in cache.get_all(k)
    again, stats = embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=6)
    assert stats["embedded_new"] == 3 and stats["reused_cached"] == len(samples) - 3
    assert all(torch.equal(again[k], full[k]) for k in full)
    assert all(f"layout@{n}" in cache.get_all(k) for k in keys)
    assert again[f"layout@{n}"].shape == (len(samples), LAYOUT_DIM)


def test_entries_of_the_old_single_vector_format_are_re_embedded_not_misread(tiny_encoder, samples, tmp_path):
    from safetensors.torch import save_file

    from vlrouter.core.images import image_digest

    root = tmp_path / "cache"
    old_fp = "0123456789abcdef"  # format 1 folders were named by another fingerprint: never looked at
    key = feature_key(old_fp, image_digest(open_image(samples[0].image)), samples[0].prompt)
    old = FeatureCache(root, old_fp)
    old.path(key).parent.mkdir(parents=True)
    save_file({"feature": torch.zeros(tiny_encoder.hidden_size)}, str(old.path(key)))
    # …and a format-1 entry under today's key would lack every view name: embedded again, not read
    cache = FeatureCache(root, tiny_encoder.fingerprint())
    k0 = sample_keys(tiny_encoder, samples[:1])[0]
    cache.path(k0).parent.mkdir(parents=True, exist_ok=True)
    save_file({"feature": torch.zeros(tiny_encoder.hidden_size)}, str(cache.path(k0)))
    views, stats = embed_dataset(tiny_encoder, samples[:1], cache, layers=LAST)
    assert stats["embedded_new"] == 1
    assert _mean(views).abs().sum() > 0


def test_an_interrupted_embed_resumes_where_it_stopped(tiny_encoder, samples, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    reference, _ = embed_dataset(tiny_encoder, samples, FeatureCache(tmp_path / "ref", tiny_encoder.fingerprint()),
                                 layers=LAST, batch_size=4)
    reference = _mean(reference)

    calls = {"n": 0}
    real = type(tiny_encoder).embed_prepared

    def crash_on_second_batch(self, batch, layers, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, batch, layers, **kw)

    monkeypatch.setattr(type(tiny_encoder), "embed_prepared", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=4)
    monkeypatch.undo()
    assert len(cache) == 4  # the first batch was written, whole; no temp files left behind
    assert not [p for p in cache.dir.rglob("*.tmp")]

    feats, stats = embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=4)
    assert stats["embedded_new"] == len(samples) - 4 and stats["reused_cached"] == 4
    torch.testing.assert_close(_mean(feats), reference, rtol=1e-4, atol=1e-5)

    # some entries deleted, one damaged: exactly those are embedded again
    keys = sample_keys(tiny_encoder, samples)
    for k in keys[:3]:
        cache.path(k).unlink()
    cache.path(keys[5]).write_bytes(b"garbage")
    feats, stats = embed_dataset(tiny_encoder, samples, cache, layers=LAST, batch_size=4)
    assert stats["embedded_new"] == 4 and stats["reused_cached"] == len(samples) - 4
    torch.testing.assert_close(_mean(feats), reference, rtol=1e-4, atol=1e-5)


def test_key_is_the_content_not_the_path(tiny_encoder, samples, tmp_path):
    fp = tiny_encoder.fingerprint()
    s = samples[0]
    copy = tmp_path / "elsewhere.png"
    shutil.copy(s.image, copy)
    moved = type(s)(**{**s.__dict__, "image": str(copy), "id": "other"})
    reworded = type(s)(**{**s.__dict__, "prompt": s.prompt + " now"})
    k0, k1, k2 = sample_keys(tiny_encoder, [s, moved, reworded])
    assert k0 == k1 != k2
    assert feature_key("other-encoder", "d", "p") != feature_key(fp, "d", "p")


def test_two_worker_processes_give_the_same_features(tiny_encoder, samples, tmp_path, monkeypatch):
    import vlrouter.core.features as features

    one, _ = embed_dataset(tiny_encoder, samples, tmp_path / "a", layers=LAST, workers=1, batch_size=4)
    before = set(multiprocessing.active_children())
    monkeypatch.setattr(features, "POOL_MIN_SAMPLES", 1)  # start the (spawned) workers even for 12 samples
    two, stats = embed_dataset(tiny_encoder, samples, tmp_path / "b", layers=LAST, workers=2, batch_size=4)
    assert stats["embedded_new"] == len(samples) and stats["workers"] == 2
    assert set(multiprocessing.active_children()) <= before  # workers shut down before it returns
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_an_image_changed_since_the_dataset_was_built_names_the_sample(tiny_encoder, samples, tmp_path):
    s = samples[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(s.image).read_bytes()[:40])
    bad = type(s)(**{**s.__dict__, "image": str(broken)})
    with pytest.raises(ImageError, match=s.source.replace("/", ".")):
        embed_dataset(tiny_encoder, [bad], tmp_path / "cache", layers=LAST)


def test_put_returns_the_entry_file_it_wrote(tiny_encoder, tmp_path):
    cache = FeatureCache(tmp_path, tiny_encoder.fingerprint())
    p = cache.put("ab" * 32, {"mean@1": torch.ones(4)})
    assert p == cache.path("ab" * 32) and p.is_file() and len(cache) == 1
    assert torch.equal(cache.get("ab" * 32, ["mean@1"])["mean@1"], torch.ones(4))


def test_a_worker_process_starts_with_one_torch_thread_quiet_logs_and_no_tokenizer_threads(tiny_model_dir,
                                                                                          monkeypatch):
    import transformers

    from vlrouter.core.features import _PROCESSORS, _worker_init

    threads, verbosity = torch.get_num_threads(), transformers.utils.logging.get_verbosity()
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    torch.set_num_threads(2)
    transformers.utils.logging.set_verbosity_warning()
    try:
        _worker_init(str(tiny_model_dir), None)  # what each spawned worker runs first
        assert torch.get_num_threads() == 1  # workers x threads never oversubscribe the cores
        assert transformers.utils.logging.get_verbosity() == transformers.utils.logging.ERROR
        assert os.environ["TOKENIZERS_PARALLELISM"] == "false"
        assert (str(tiny_model_dir), None) in _PROCESSORS
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)
