"""Every error is one line: ``file:LINE: field: problem (fix: ...)``, with what is known of the place."""

from __future__ import annotations

from vlrouter.core.errors import located


def test_located_formats_every_combination_of_place():
    assert located("r.yaml", "train.lr", "must be > 0", fix="set it", line=7) == \
        "r.yaml:7: train.lr: must be > 0 (fix: set it)"
    assert located("r.yaml", 7, "bad") == "r.yaml:7: bad"  # an int place is a line
    assert located("r.yaml", None, "bad") == "r.yaml: bad"
    assert located(None, None, "bad", line=3) == "line 3: bad"  # a line without a file still says where
    assert located(None, "adapters[1].name", "bad") == "adapters[1].name: bad"
    assert located(None, None, "bad") == "bad"
