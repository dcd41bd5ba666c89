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
from vlrouter.core.encoder import prompt_token_limit, set_prompt_token_limit
from vlrouter.core.errors import ImageError, InputError
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


def _crash_on_second_batch(encoder, monkeypatch) -> None:
    """The encoder's second forward raises KeyboardInterrupt (Ctrl-C mid-embed); the first goes through."""
    real = type(encoder).embed_prepared
    calls = {"n": 0}

    def crash(self, batch, layers, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, batch, layers, **kw)

    monkeypatch.setattr(type(encoder), "embed_prepared", crash)


def test_an_interrupted_embed_resumes_where_it_stopped(tiny_encoder, samples, tmp_path, monkeypatch):
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    reference, _ = embed_dataset(tiny_encoder, samples, FeatureCache(tmp_path / "ref", tiny_encoder.fingerprint()),
                                 layers=LAST, batch_size=4)
    reference = _mean(reference)

    _crash_on_second_batch(tiny_encoder, monkeypatch)
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
    from vlrouter.core.images import image_digest

    digest = image_digest(open_image(s.image))
    assert k0 == feature_key(fp, digest, s.prompt)  # sha256(encoder fingerprint, pixels, prompt), as documented
    assert sample_keys(tiny_encoder, [s], encoder_fp="remote-fp") == [feature_key("remote-fp", digest, s.prompt)]


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
        _worker_init(str(tiny_model_dir), None, 8)  # the run's router.max_prompt_tokens travels to the workers
        assert prompt_token_limit(_PROCESSORS[(str(tiny_model_dir), None)]) == 8
    finally:
        torch.set_num_threads(threads)
        transformers.utils.logging.set_verbosity(verbosity)
        if (str(tiny_model_dir), None) in _PROCESSORS:
            set_prompt_token_limit(_PROCESSORS[(str(tiny_model_dir), None)], 4096)


def test_an_empty_cache_holds_no_entries(tmp_path):
    assert len(FeatureCache(tmp_path / "never-written", "fp")) == 0


def test_put_keeps_the_views_it_does_not_replace_and_drops_damaged_ones(tmp_path):
    from safetensors.torch import save_file

    cache = FeatureCache(tmp_path, "fp")
    key = "cd" * 32
    cache.path(key).parent.mkdir(parents=True)
    save_file({"mean@1": torch.ones(4), "image-grid@1": torch.ones(16),  # good views of a 4-wide model
               "last@1": torch.full((4,), float("nan")), "text-mean@1": torch.ones(3),  # damaged
               "feature": torch.ones(4)}, str(cache.path(key)))  # not a view (the old format)
    assert not cache.has("ef" * 32) and cache.has(key)
    cache.put(key, {"mean@2": torch.full((4,), 2.0)})  # a deeper layer asked for later
    entry = cache.get_all(key)
    assert sorted(entry) == ["image-grid@1", "mean@1", "mean@2"]
    assert torch.equal(entry["mean@1"], torch.ones(4)) and torch.equal(entry["mean@2"], torch.full((4,), 2.0))
    cache.put(key, {"mean@1": torch.zeros(4)})  # a view it does replace
    assert torch.equal(cache.get(key, ["mean@1"])["mean@1"], torch.zeros(4)) and len(cache.get_all(key)) == 3


@pytest.mark.parametrize("kw", [{"batch_size": 0}, {"workers": 0}])
def test_a_batch_size_or_worker_count_below_one_is_refused_with_the_setting_to_fix(tiny_encoder, samples, tmp_path,
                                                                                    kw):
    with pytest.raises(InputError) as e:
        embed_dataset(tiny_encoder, samples, tmp_path / "cache", layers=LAST, **kw)
    assert str(e.value).startswith("batch_size/workers: must be >= 1") and "train.embed_batch_size" in str(e.value)
    assert not (tmp_path / "cache").exists()  # refused before anything is hashed or written


def test_a_sample_repeated_in_the_dataset_is_embedded_once_and_the_rest_still_are(tiny_encoder, samples, tmp_path):
    a, b, c = samples[0], samples[1], samples[7]
    again = type(a)(**{**a.__dict__, "id": "a-again"})  # same screenshot + instruction: the same cache key
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    feats, stats = embed_dataset(tiny_encoder, [a, b, again, c], cache, layers=LAST, batch_size=2)
    assert stats["forwarded"] == 3 and stats["embedded_new"] == 4 and stats["reused_cached"] == 0 and len(cache) == 3
    from safetensors import safe_open

    with safe_open(str(cache.path(sample_keys(tiny_encoder, [a])[0])), "pt") as f:  # whose entry this is
        assert f.metadata() == {"encoder": tiny_encoder.fingerprint(), "id": a.id}
    single, _ = embed_dataset(tiny_encoder, [a, b, c], cache, layers=LAST)
    mean = _mean(feats)
    assert torch.equal(mean[0], mean[2]) and torch.equal(mean[[0, 1, 3]], _mean(single))
    _, stats = embed_dataset(tiny_encoder, [a, again, b, c], cache, layers=LAST)
    assert stats["embedded_new"] == 0 and stats["reused_cached"] == 4 and stats["forwarded"] == 0


def test_stats_report_the_seconds_it_took_and_one_worker_when_no_pool_was_worth_starting(tiny_encoder, samples,
                                                                                         tmp_path):
    import time

    before = set(multiprocessing.active_children())
    t0 = time.perf_counter()
    _, stats = embed_dataset(tiny_encoder, samples[:3], tmp_path / "cache", layers=LAST, workers=2, batch_size=1)
    took = time.perf_counter() - t0
    assert 0 <= stats["seconds"] <= round(took, 3) + 0.001
    assert stats["workers"] == 1  # 3 samples < POOL_MIN_SAMPLES: decoded here, no process started
    assert set(multiprocessing.active_children()) <= before


def test_one_worker_means_no_pool(tiny_encoder):
    from vlrouter.core.features import make_pool

    assert make_pool(tiny_encoder, 1) is None and make_pool(tiny_encoder, 0) is None


class _LazyPool:
    """An in-process stand-in for the worker pool: a job runs when its result is first asked for, so the test sees
    how many jobs were queued at once and which ones ever ran."""

    class _Job:
        def __init__(self, pool, fn, args):
            self.pool, self.fn, self.args, self.done = pool, fn, args, False

        def result(self):
            if not self.done:
                self.pool.queued.remove(self)
                self.value, self.done = self.fn(*self.args), True
                self.pool.ran.append(self.fn.__name__)
            return self.value

    def __init__(self):
        self.queued: list = []
        self.ran: list[str] = []
        self.most: dict[str, int] = {}
        self.closed = False

    def submit(self, fn, *args):
        job = self._Job(self, fn, args)
        self.queued.append(job)
        n = sum(j.fn is fn for j in self.queued)
        self.most[fn.__name__] = max(self.most.get(fn.__name__, 0), n)
        return job

    def shutdown(self, wait=True, cancel_futures=False):
        if not cancel_futures:  # like a real pool: the queued jobs still run before shutdown returns
            for job in list(self.queued):
                job.result()
        self.queued.clear()
        self.closed = wait  # without waiting, a real pool's processes outlive the call


def test_hashing_keeps_four_chunks_a_worker_queued_and_returns_keys_in_sample_order(tiny_encoder, samples):
    plain = sample_keys(tiny_encoder, samples, chunk=1)
    for workers, most in ((2, 8), (1, 4), (None, 4)):  # None: the default, one worker
        pool = _LazyPool()
        kw = {} if workers is None else {"workers": workers}
        assert sample_keys(tiny_encoder, samples, pool=pool, chunk=1, **kw) == plain
        assert pool.most == {"digest_shard": most}  # the workers stay busy; no more screenshots held than that
    pool = _LazyPool()
    seventeen = [type(samples[0])(**{**samples[0].__dict__, "id": f"copy-{i}"}) for i in range(17)]
    sample_keys(tiny_encoder, seventeen, pool=pool)
    assert pool.ran == ["digest_shard"] * 2  # at most 16 screenshots a job: 17 are spread over two


@pytest.fixture
def fake_pool(tiny_encoder, monkeypatch):
    """embed_dataset's worker pool replaced by a :class:`_LazyPool` (made for ``tiny_encoder`` and 2 workers)."""
    import vlrouter.core.features as features

    pool = _LazyPool()

    def make_pool(encoder, workers):
        assert encoder is tiny_encoder and workers == 2
        return pool

    monkeypatch.setattr(features, "make_pool", make_pool)
    monkeypatch.setitem(features._PROCESSORS, (tiny_encoder.base_model, None), tiny_encoder.processor)
    return pool


@pytest.fixture
def lazy_pool(fake_pool, monkeypatch):
    """:func:`fake_pool`, started for any number of samples."""
    import vlrouter.core.features as features

    monkeypatch.setattr(features, "POOL_MIN_SAMPLES", 1)
    return fake_pool


def test_worker_processes_start_only_for_at_least_32_samples_to_process(tiny_encoder, samples, tmp_path, fake_pool):
    copies = [type(samples[0])(**{**samples[0].__dict__, "id": f"copy-{i}"}) for i in range(32)]  # cheap: one key
    _, stats = embed_dataset(tiny_encoder, copies[:31], tmp_path / "cache", layers=LAST, workers=2)
    assert stats["workers"] == 1 and fake_pool.ran == []  # README: workers only for >= 32 samples
    _, stats = embed_dataset(tiny_encoder, copies, tmp_path / "cache", layers=LAST, workers=2)
    assert stats["workers"] == 2 and fake_pool.ran == ["digest_shard", "digest_shard"] and fake_pool.closed
    _, stats = embed_dataset(tiny_encoder, copies, tmp_path / "cache", layers=LAST, workers=1)
    assert stats["workers"] == 1 and len(fake_pool.ran) == 2  # one worker: never a pool


def test_with_two_workers_two_shards_a_worker_are_prepared_ahead_and_the_features_are_the_same(tiny_encoder, samples,
                                                                                           tmp_path, lazy_pool):
    five = samples[:5]  # five shards of one
    one, _ = embed_dataset(tiny_encoder, five, tmp_path / "a", layers=LAST, batch_size=1)
    two, stats = embed_dataset(tiny_encoder, five, tmp_path / "b", layers=LAST, workers=2, batch_size=1)
    assert lazy_pool.most["_prepare_job"] == 4 and lazy_pool.ran.count("_prepare_job") == 5
    assert stats["workers"] == 2 and lazy_pool.closed
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_an_interrupted_embed_cancels_the_shards_still_queued_in_the_pool(tiny_encoder, samples, tmp_path,
                                                                         lazy_pool, monkeypatch):
    _crash_on_second_batch(tiny_encoder, monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(tiny_encoder, samples, tmp_path / "cache", layers=LAST, workers=2, batch_size=2)
    # Ctrl-C stops at once: the two shards it reached were prepared, the ones queued behind them never are
    assert lazy_pool.ran.count("_prepare_job") == 2 and lazy_pool.closed


def test_the_cpu_stage_uses_the_runs_processor_and_its_prompt_limit_and_names_the_dataset_line(tiny_encoder,
                                                                                               samples, tmp_path):
    proc = tiny_encoder.processor
    try:
        set_prompt_token_limit(proc, 2)  # router.max_prompt_tokens: 2
        with pytest.raises(InputError) as e:
            prepare_shard(tiny_encoder.base_model, samples[:1], processor=proc)
        assert str(e.value).startswith(f"{samples[0].source}: ") and "over router.max_prompt_tokens=2" in str(e.value)
        with pytest.raises(InputError, match="over router.max_prompt_tokens=2"):  # in process, the same processor
            embed_dataset(tiny_encoder, samples[:1], tmp_path / "cache", layers=LAST)
    finally:
        set_prompt_token_limit(proc, 4096)


def test_by_default_eight_samples_go_through_the_model_at_a_time(tiny_encoder, samples, tmp_path, monkeypatch):
    real = type(tiny_encoder).embed_prepared
    sizes = []

    def counting(self, batch, layers, **kw):
        sizes.append(int(batch["input_ids"].shape[0]))
        return real(self, batch, layers, **kw)

    monkeypatch.setattr(type(tiny_encoder), "embed_prepared", counting)
    embed_dataset(tiny_encoder, samples[:9], tmp_path / "cache", layers=LAST)
    assert sizes == [8, 1]  # train.embed_batch_size's default


def test_nan_features_are_refused_naming_the_view_how_many_rows_and_the_fix():
    from vlrouter.core.features import check_features

    good = torch.zeros(3, 4)
    bad = good.clone()
    bad[0, 1], bad[2, 1] = float("nan"), float("inf")  # two rows (in one column)
    check_features({"mean@2": good, "last@2": torch.zeros(0, 4)}, "data/routing")  # finite, or empty: fine
    with pytest.raises(InputError) as e:
        check_features({"mean@2": good, "last@2": bad}, "data/routing")
    assert str(e.value).startswith("data/routing: last@2: 2 feature rows contain NaN/inf")
    assert "router.dtype: float32" in str(e.value)


def test_no_samples_give_empty_views_of_each_views_width(tiny_encoder, tmp_path):
    from vlrouter.core.views import Representation

    views, stats = embed_dataset(tiny_encoder, [], tmp_path / "cache", layers=LAST)
    h, n = tiny_encoder.hidden_size, tiny_encoder.num_layers
    assert {k: tuple(v.shape) for k, v in views.items()} == {
        f"{v}@{n}": (0, {"image-grid": 4 * h, "layout": LAYOUT_DIM}.get(v, h))
        for v in CACHED_VIEWS}  # as wide as when there are samples
    assert Representation(("mean", "image-grid"), n).features(views).shape == (0, 5 * h)  # what a head reads
    assert stats["embedded_new"] == stats["reused_cached"] == stats["forwarded"] == 0


def test_prepared_items_go_eight_at_a_time_in_the_batch_the_processor_would_make(tiny_encoder, samples, tmp_path,
                                                                                  monkeypatch):
    from vlrouter.core.features import embed_prepared_items

    nine = samples[:9]
    items = prepare_shard(tiny_encoder.base_model, nine, processor=tiny_encoder.processor)
    keys = sample_keys(tiny_encoder, nine)
    real = type(tiny_encoder).embed_prepared
    batches = []

    def recording(self, batch, layers, **kw):
        batches.append(batch)
        return real(self, batch, layers, **kw)

    monkeypatch.setattr(type(tiny_encoder), "embed_prepared", recording)
    cache = FeatureCache(tmp_path, tiny_encoder.fingerprint())
    out = embed_prepared_items(tiny_encoder, cache, keys, items, LAST)
    assert [int(b["input_ids"].shape[0]) for b in batches] == [8, 1] and len(out) == 9
    together = tiny_encoder.prepare([open_image(s.image) for s in nine[:8]], [s.prompt for s in nine[:8]])
    assert torch.equal(batches[0]["input_ids"], together["input_ids"])  # padded with the tokenizer's pad token
    assert all(torch.equal(cache.get_all(k)[n], v[n]) for k, v in zip(keys, out) for n in v)
