"""Fuzzing the two readers of files people write: registry.yaml and adapter datasets (JSONL).

Whatever bytes come in, only vlrouter's own errors (subclasses of
:class:`vlrouter.core.errors.RouterError`) may escape, and their message is one line --
the CLI prints ``str(err)`` as the single error line. A registry that loads also saves
and loads back to the same model (``router add-adapter`` rewrites the file).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from vlrouter.core.data import read_adapter_dataset
from vlrouter.core.errors import RouterError
from vlrouter.core.registry import Registry

# CI runs a fixed (derandomized) 200 examples per test, a few seconds in all. To hunt for more:
#   VLROUTER_FUZZ_EXAMPLES=3000 VLROUTER_FUZZ_RANDOM=1 .venv/bin/python -m pytest -q tests/fuzz
FUZZ = settings(max_examples=int(os.environ.get("VLROUTER_FUZZ_EXAMPLES", "200")), deadline=None,
                derandomize=os.environ.get("VLROUTER_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

VALID_REGISTRY = """\
# a comment
base_model: Qwen/Qwen3-VL-8B-Instruct  # hub id
router:
  dir: runs/router
  pooling: mean
  layer: -1
  min_confidence: 0.0
  fallback: base
train:
  backend: local
  epochs: 50
  batch_size: 8
  lr: 1.0e-4
modal:
  gpu: H100
adapters:
  - name: calendar
    plugin: vlrouter.adapters.calendar
    dataset: data/calendar/train.jsonl
    checkpoint: checkpoints/calendar
  - name: claim-window
    dataset: data/claim-window/train.jsonl
    checkpoint: checkpoints/claim-window
"""


def _check_registry(raw: bytes) -> None:
    try:
        reg = Registry.from_bytes(raw, "registry.yaml")
    except RouterError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert msg.startswith("registry.yaml"), msg  # names the file
        event(f"refused: {type(e).__name__}")
        return
    event("loaded")
    # Loaded: the round-trip that every edit goes through must hold too.
    again = Registry.from_bytes(reg.to_text().encode("utf-8"), "registry.yaml")
    assert again.model == reg.model


# ---- registry.yaml ------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=400))
@example(b"\x00")
@example(b"\xff\xfe")
@example(b"&a [*a]")
@example(b"a: &a\n  b: *a\n")
@example(b"base_model: x\nrouter: &r\n  dir: *r\n")
def test_registry_from_arbitrary_bytes(raw):
    _check_registry(raw)


_JUNK = [
    "first", "Claim_Window", "-0.1", "99999999999999999999999", ".nan", ".inf", "-.inf", "null", "~", "true", "no",
    "''", '""', "[]", "{}", "[1, 2]", "{a: 1}", "!!binary aGVsbG8=", "!!python/object:os.system", "2001-01-01",
    "0x1F", "0o17", "&anchor x", "*anchor", "|\n    block", ">-\n    folded", "'unterminated", '"esc \\x00 \\u2028"',
    "é ü 中", "a: b", "- item", "# comment", "\t", "../up", "[", "}", "@x", "`x`", "%x",
]
# Plausible values per key (so that a good share of the generated files load), else "x".
_GOOD = {
    "base_model": ["Qwen/Qwen3-VL-8B-Instruct", "models/tiny", "/abs/model"], "base_model_revision": ["main", "null"],
    "dir": ["runs/router", "r"], "pooling": ["mean", "last"], "layer": ["-1", "-2", "0", "3"],
    "min_confidence": ["0.0", "0.5", "1"], "fallback": ["base", "error", "calendar"], "dtype": ["auto", "float32"],
    "backend": ["local", "modal"], "epochs": ["1", "50"], "batch_size": ["1", "8"], "lr": ["1.0e-4", "0.01"],
    "patience": ["1", "5"], "eval_every": ["1", "20"], "val_fraction": ["0.2", "0.5"], "seed": ["0", "-3"],
    "head": ["linear", "mlp"], "head_hidden": ["8", "512"], "train_samples": ["10", "null"], "workers": ["1", "2"],
    "eval_samples": ["0", "5"], "embed_batch_size": ["8"], "datasets_dir": ["datasets"], "cache_dir": [".features"],
    "app_name": ["vlrouter"], "gpu": ["H100", "A100-80GB:2"], "cpu_shards": ["8"], "data_volume": ["v"],
    "name": ["calendar", "claim-window", "provider-select", "x1"], "plugin": ["vlrouter.adapters.calendar"],
    "dataset": ["data/a.jsonl", "/abs/d.jsonl"], "checkpoint": ["checkpoints/a"], "description": ["Pick a date"],
}
_SECTIONS = {
    "router": ["dir", "pooling", "layer", "min_confidence", "fallback", "dtype"],
    "train": ["backend", "epochs", "batch_size", "lr", "patience", "eval_every", "val_fraction", "seed", "head",
              "head_hidden", "train_samples", "eval_samples", "workers", "embed_batch_size", "datasets_dir",
              "cache_dir"],
    "modal": ["app_name", "data_volume", "gpu", "cpu_shards"],
}
_ADAPTER_KEYS = ["name", "plugin", "dataset", "checkpoint", "description"]
_STRAY = ["colour", "epoch", "datset", "adaptors", "0", "~", "? [a]", "<<", "name", "router"]


def _value(key: str):
    if key not in _GOOD:
        return st.sampled_from(_JUNK + ["x"])
    good = st.sampled_from(_GOOD[key])
    return st.one_of(good, good, good, good, good, good, good, st.sampled_from(_JUNK))  # junk 1 time in 8


def _key(keys: list[str]):
    """Mostly a key that belongs there, sometimes a stray one (typo, wrong section, odd YAML)."""
    return st.one_of(*[st.sampled_from(keys)] * 7, st.sampled_from(_STRAY))  # stray 1 time in 8


def _mapping(keys: list[str], indent: str):
    pair = _key(keys).flatmap(lambda k: _value(k).map(lambda v: f"{indent}{k}: {v}"))
    return st.lists(pair, max_size=len(keys)).map(lambda lines: "\n".join(lines))


def _adapters():
    item = st.lists(_key(_ADAPTER_KEYS).flatmap(lambda k: _value(k).map(lambda v: (k, v))), min_size=1, max_size=6)
    def render(pairs):
        return "\n".join(("  - " if i == 0 else "    ") + f"{k}: {v}" for i, (k, v) in enumerate(pairs))

    return st.lists(item.map(render), max_size=4).map(lambda items: "adapters:\n" + "\n".join(items) if items
                                                      else "adapters: []")


@st.composite
def _grammar_registry(draw) -> str:
    """registry.yaml text from a grammar of its keys and values, with stray keys and junk values mixed in."""
    parts = []
    if draw(st.integers(0, 9)):  # base_model is usually there
        parts.append(f"base_model: {draw(_value('base_model'))}")
    for section, keys in _SECTIONS.items():
        if draw(st.booleans()):
            body = draw(_mapping(keys, "  "))
            parts.append(f"{section}:\n{body}" if body else f"{section}: {draw(st.sampled_from(['{}', 'null', '3']))}")
    if draw(st.integers(0, 4)):
        parts.append(draw(_adapters()))
    if not draw(st.integers(0, 4)):
        parts.append(draw(_mapping(_STRAY + ["base_model"], "")))
    order = draw(st.permutations(parts))
    return "\n".join(order) + "\n"


@FUZZ
@given(_grammar_registry())
def test_registry_from_grammar_built_yaml(text):
    _check_registry(text.encode("utf-8"))


_INSERTS = [b":", b" ", b"  ", b"\n", b"\t", b"-", b"- ", b"[", b"]", b"{", b"}", b"&a ", b"*a", b"!!", b"#", b"'",
            b'"', b"?", b"|", b">", b"%", b"@", b"`", b"\x00", b"\xff", b"\xc3", b"\r", b"\xe2\x80\xa8", b"\\", b",",
            b"0", b"-1", b"1e999", b"null", b"~", b"name: calendar\n", b"  - name: x\n", b"<<: *a\n"]


@st.composite
def _mutated(draw, source: bytes):
    data = bytearray(source)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "dup-line", "drop-line", "swap-lines", "truncate"]))
        pos = draw(st.integers(0, len(data)))
        if op == "insert":
            data[pos:pos] = draw(st.sampled_from(_INSERTS))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 12))]
        elif op == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del data[pos:]
        else:
            lines = bytes(data).split(b"\n")
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            if op == "dup-line":
                lines.insert(j, lines[i])
            elif op == "drop-line":
                del lines[i]
            else:
                lines[i], lines[j] = lines[j], lines[i]
            data = bytearray(b"\n".join(lines))
    return bytes(data)


@FUZZ
@given(_mutated(VALID_REGISTRY.encode()))
def test_registry_from_mutations_of_a_valid_one(raw):
    _check_registry(raw)


def test_the_valid_registry_used_for_mutations_loads():
    assert Registry.from_bytes(VALID_REGISTRY.encode(), "registry.yaml").adapter_names == ["calendar", "claim-window"]


# ---- adapter datasets (JSONL) ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset_dir():
    """A folder with one good PNG, one truncated PNG and one text file posing as an image."""
    with tempfile.TemporaryDirectory(prefix="vlrouter-fuzz-") as d:
        root = Path(d)
        (root / "images").mkdir()
        Image.new("RGB", (32, 24), (200, 30, 30)).save(root / "images" / "ok.png")
        good = (root / "images" / "ok.png").read_bytes()
        (root / "images" / "half.png").write_bytes(good[: len(good) // 2])
        (root / "images" / "text.png").write_bytes(b"not an image")
        yield root


def _line(image: str = "images/ok.png", prompt: str = "<image>\nClick March 29", target: str = "click(x=1, y=2)",
          sid: str = "s-1") -> dict:
    return {"id": sid, "image": image,
            "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": target}],
            "metadata": {"task": "calendar"}}


def _check_dataset(root: Path, data: bytes) -> None:
    path = root / "train.jsonl"
    path.write_bytes(data)
    try:
        samples, skipped = read_adapter_dataset(path, adapter="calendar")
    except RouterError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        assert str(path) in msg, msg  # names the file
        event(f"refused: {type(e).__name__}")
        return
    event("read" + (" (some skipped)" if skipped else ""))
    assert samples  # a result always holds at least one usable sample
    for s in samples:
        assert Path(s.image).is_file() and s.prompt and "<image>" not in s.prompt
    assert all(isinstance(i, str) for i in skipped.missing + skipped.corrupt)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@FUZZ
@given(st.lists(st.one_of(
    st.binary(max_size=60),
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    _JSON_VALUES.map(lambda v: json.dumps(v).encode()),
), max_size=6))
@example([b"1" * 5000])  # an integer over Python's int-from-string digit limit
@example([b"[" * 100_000])  # nesting deeper than the JSON decoder's recursion limit
@example([json.dumps(_line(image="~no-such-user-vlrouter/x.png")).encode()])
@example([json.dumps(_line(image="images/ok\x00.png")).encode()])
@example([json.dumps(_line(image="x" * 5000 + ".png")).encode()])
def test_dataset_from_arbitrary_lines(dataset_dir, lines):
    _check_dataset(dataset_dir, b"\n".join(lines) + b"\n")


_IMAGES = ["images/ok.png", "images/half.png", "images/text.png", "images/missing.png", "images", "", " ",
           "/", "~", "~no-such-user-vlrouter/x.png", "images/ok\x00.png", "x" * 300, "../" * 40 + "etc/passwd",
           "images/ok.png\n", "IMAGES/OK.PNG"]
_PROMPTS = ["<image>\nClick March 29", "<image>", "", "   ", "<image><image>\n", "Click\u2028now", "\x00", "é" * 50,
            "<image>\n<image>\nTwo images"]


@st.composite
def _mutated_record(draw):
    ok = draw(st.integers(0, 2)) > 0  # two lines in three start from a fully valid one
    rec = _line(image=draw(st.sampled_from(_IMAGES[:4] if ok else _IMAGES)),
                prompt=draw(st.sampled_from(_PROMPTS[:1] if ok else _PROMPTS)))
    for _ in range(draw(st.integers(0, 0 if ok else 4))):
        op = draw(st.sampled_from(["drop-key", "set-key", "drop-turn", "bad-turn", "role", "value"]))
        if op == "drop-key":
            rec.pop(draw(st.sampled_from(["id", "image", "conversations", "metadata"])), None)
        elif op == "set-key":
            rec[draw(st.sampled_from(["id", "image", "conversations", "metadata", "adapter", "label"]))] = \
                draw(_JSON_VALUES)
        elif isinstance(rec.get("conversations"), list) and rec["conversations"]:
            turns = rec["conversations"]
            i = draw(st.integers(0, len(turns) - 1))
            if op == "drop-turn":
                del turns[i]
            elif op == "bad-turn":
                turns[i] = draw(_JSON_VALUES)
            elif isinstance(turns[i], dict) and op == "role":
                turns[i]["from"] = draw(st.sampled_from(["human", "user", "gpt", "assistant", "system", None, 3, []]))
            elif isinstance(turns[i], dict):
                turns[i]["value"] = draw(_JSON_VALUES)
    text = json.dumps(rec, ensure_ascii=draw(st.booleans()))
    if not ok and draw(st.booleans()):  # and break the JSON text itself a little
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["", "}", ",", '"', "\\", "\x00", "\n", "\r"])) + text[cut + 1:]
    return text.encode("utf-8", "surrogatepass")


@FUZZ
@given(st.lists(_mutated_record(), min_size=1, max_size=5), st.randoms(use_true_random=False))
def test_dataset_from_mutated_valid_lines(dataset_dir, lines, rnd: random.Random):
    good = [json.dumps(_line(sid=f"g-{i}")).encode() for i in range(rnd.randrange(3))]
    merged = good + lines
    rnd.shuffle(merged)
    _check_dataset(dataset_dir, b"\n".join(merged) + b"\n")


def test_the_valid_dataset_line_reads(dataset_dir):
    path = dataset_dir / "ok.jsonl"
    path.write_text(json.dumps(_line()) + "\n")
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert [s.prompt for s in samples] == ["Click March 29"] and not skipped
