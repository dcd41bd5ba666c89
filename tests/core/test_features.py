"""The feature cache: embed only what is missing, resume after interruption, never a pickle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import make_dataset
from vlrouter.core.data import read_adapter_dataset
from vlrouter.core.errors import ImageError
from vlrouter.core.features import FeatureCache, collate, embed_dataset, feature_key, prepare_shard, sample_keys


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("feat")
    out = []
    for task in ("calendar", "provider-select"):
        path = make_dataset(root / task, task, 6)
        out += read_adapter_dataset(path, adapter=task)[0]
    return out


def test_collate_of_per_sample_outputs_equals_processing_the_batch(tiny_encoder, samples):
    from vlrouter.core.images import open_image

    batch = samples[:4]
    per_sample = prepare_shard(tiny_encoder.base_model, batch, processor=tiny_encoder.processor)
    together = tiny_encoder.prepare([open_image(s.image) for s in batch], [s.prompt for s in batch])
    merged = collate(per_sample, tiny_encoder.processor.tokenizer.pad_token_id)
    assert set(merged) == set(together)
    for k in together:
        assert torch.equal(merged[k], together[k]), k


def test_embed_twice_embeds_nothing_the_second_time(tiny_encoder, samples, tmp_path):
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    feats, stats = embed_dataset(tiny_encoder, samples, cache, batch_size=5)
    assert feats.shape == (len(samples), tiny_encoder.hidden_size) and feats.dtype == torch.float32
    assert stats["embedded_new"] == len(samples) and stats["reused_cached"] == 0
    # one safetensors file per sample at <root>/<encoder fp>/<key[:2]>/<key>.safetensors; no pickles
    files = sorted((tmp_path / "cache").rglob("*"))
    entries = [f for f in files if f.is_file()]
    assert len(entries) == len(samples) and all(f.suffix == ".safetensors" for f in entries)
    for f in entries:
        assert f.parent.parent.name == tiny_encoder.fingerprint() and f.parent.name == f.stem[:2]

    again, stats2 = embed_dataset(tiny_encoder, samples, cache, batch_size=5)
    assert stats2["embedded_new"] == 0 and stats2["reused_cached"] == len(samples) and stats2["forwarded"] == 0
    assert torch.equal(again, feats)
    # features match a plain forward of each sample (cache = what the engine would compute)
    direct = tiny_encoder.embed([__import__("vlrouter.core.images", fromlist=["x"]).open_image(samples[0].image)],
                                [samples[0].prompt])
    torch.testing.assert_close(feats[0], direct[0], rtol=1e-4, atol=1e-5)


def test_an_interrupted_embed_resumes_where_it_stopped(tiny_encoder, samples, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    reference, _ = embed_dataset(tiny_encoder, samples, FeatureCache(tmp_path / "ref", tiny_encoder.fingerprint()),
                                 batch_size=4)

    calls = {"n": 0}
    real = type(tiny_encoder).embed_prepared

    def crash_on_second_batch(self, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(type(tiny_encoder), "embed_prepared", crash_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(tiny_encoder, samples, cache, batch_size=4)
    monkeypatch.undo()
    assert len(cache) == 4  # the first batch was written, whole; no temp files left behind
    assert not [p for p in cache.dir.rglob("*.tmp")]

    feats, stats = embed_dataset(tiny_encoder, samples, cache, batch_size=4)
    assert stats["embedded_new"] == len(samples) - 4 and stats["reused_cached"] == 4
    torch.testing.assert_close(feats, reference, rtol=1e-4, atol=1e-5)

    # some entries deleted, one damaged: exactly those are embedded again
    keys = sample_keys(tiny_encoder, samples)
    for k in keys[:3]:
        cache.path(k).unlink()
    cache.path(keys[5]).write_bytes(b"garbage")
    feats, stats = embed_dataset(tiny_encoder, samples, cache, batch_size=4)
    assert stats["embedded_new"] == 4 and stats["reused_cached"] == len(samples) - 4
    torch.testing.assert_close(feats, reference, rtol=1e-4, atol=1e-5)


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

    one, _ = embed_dataset(tiny_encoder, samples, tmp_path / "a", workers=1, batch_size=4)
    monkeypatch.setattr(features, "POOL_MIN_SAMPLES", 1)  # start the (spawned) workers even for 12 samples
    two, stats = embed_dataset(tiny_encoder, samples, tmp_path / "b", workers=2, batch_size=4)
    assert stats["embedded_new"] == len(samples) and stats["workers"] == 2
    assert torch.equal(one, two)


def test_an_image_changed_since_the_dataset_was_built_names_the_sample(tiny_encoder, samples, tmp_path):
    s = samples[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(Path(s.image).read_bytes()[:40])
    bad = type(s)(**{**s.__dict__, "image": str(broken)})
    with pytest.raises(ImageError, match=s.source.replace("/", ".")):
        embed_dataset(tiny_encoder, [bad], tmp_path / "cache")
