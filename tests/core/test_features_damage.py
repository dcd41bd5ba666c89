"""Damaged feature-cache entries are embedded again, never stacked into a run (they broke every later retrain)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import make_dataset
from vlrouter.core.data import read_adapter_dataset
from vlrouter.core.features import FeatureCache, embed_dataset, sample_keys


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.zeros(2, 64), torch.full((64,), float("nan"))],
                         ids=["wrong-length", "wrong-rank", "nan"])
def test_a_cache_entry_of_the_wrong_shape_is_embedded_again(tiny_encoder, tmp_path, bad):
    samples = read_adapter_dataset(make_dataset(tmp_path / "cal", "calendar", 3), adapter="calendar")[0]
    cache = FeatureCache(tmp_path / "cache", tiny_encoder.fingerprint())
    good, _ = embed_dataset(tiny_encoder, samples, cache, layers=[-1])
    key = sample_keys(tiny_encoder, samples[:1])[0]
    name = f"mean@{tiny_encoder.num_layers}"
    entry = cache.get_all(key)
    save_file({**entry, name: bad.contiguous(), "junk": torch.ones(1)}, str(cache.path(key)))  # e.g. another tool
    feats, stats = embed_dataset(tiny_encoder, samples, cache, layers=[-1])  # was: RuntimeError from torch.stack
    assert stats["embedded_new"] == 1 and stats["reused_cached"] == 2
    for k in good:
        torch.testing.assert_close(feats[k], good[k])
    rewritten = cache.get_all(key)
    assert rewritten[name].shape == (tiny_encoder.hidden_size,) and "junk" not in rewritten  # rewritten whole
