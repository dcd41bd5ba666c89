"""The routing dataset's edges: tiny adapters and held-out samples, what is reported, skipped-sample ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import corrupt_file, make_dataset, registry_text
from vlrouter.core.data import build_routing_dataset, read_adapter_dataset
from vlrouter.core.progress import RecordingProgress
from vlrouter.core.registry import Registry

BASE = "Qwen/Qwen3-VL-8B-Instruct"  # never loaded here


def _registry(root: Path, sizes: dict[str, int]) -> Registry:
    for task, n in sizes.items():
        make_dataset(root / "data" / task, task, n)
    path = root / "registry.yaml"
    path.write_text(registry_text(BASE, [(t, f"data/{t}/train.jsonl") for t in sizes]))
    return Registry.load(path)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _shortfalls(prog: RecordingProgress, flag: str) -> list[tuple[str, int]]:
    """``(adapter, how many it has)`` for each "NAME: only N ... FLAG" message."""
    found = [re.match(r"(\S+): only (\d+) .*" + flag, m) for m in prog.messages]
    return [(m.group(1), int(m.group(2))) for m in found if m]


def test_held_out_samples_never_leave_an_adapter_fewer_than_two_for_train_and_val(tmp_path):
    reg = _registry(tmp_path / "proj", {"calendar": 2, "claim-window": 3, "provider-select": 10})
    prog = RecordingProgress()
    out = build_routing_dataset(reg, tmp_path / "ds", eval_samples=3, progress=prog)
    counts = json.loads((out / "metadata.json").read_text())["counts"]
    used = {n: counts["train"][n] + counts["val"][n] for n in reg.adapter_names}
    assert used == {"calendar": 2, "claim-window": 2, "provider-select": 7}
    assert counts["eval"] == {"calendar": 0, "claim-window": 1, "provider-select": 3}
    # a short eval split is reported, per adapter; a full one is not
    assert _shortfalls(prog, "--eval-samples") == [("calendar", 0), ("claim-window", 1)]
    assert ("reading adapter datasets", 3, 3) in prog.tasks  # a progress bar that ends full


def test_a_short_train_draw_is_reported(tmp_path):
    reg = _registry(tmp_path / "proj", {"calendar": 4, "claim-window": 8})
    prog = RecordingProgress()
    build_routing_dataset(reg, tmp_path / "ds", train_samples=6, progress=prog)
    assert _shortfalls(prog, "--train-samples") == [("calendar", 4)]


def test_skipped_summary_lists_the_first_ids_and_counts_the_rest(tmp_path):
    path = make_dataset(tmp_path / "cal", "calendar", 40)
    recs = _lines(path)
    for r in recs[:20]:
        (path.parent / r["image"]).unlink()
    for r in recs[20:32]:
        corrupt_file(path.parent / r["image"])
    _, skipped = read_adapter_dataset(path, adapter="calendar")
    text = skipped.summary()
    assert "skipped 32 samples: 20 missing images" in text and "12 corrupt images" in text
    listed = [r["id"] for r in recs[:20] if r["id"] in text]
    assert listed == [r["id"] for r in recs[:len(listed)]] and 0 < len(listed) < 20  # the first ones, in order
    bad = [r["id"] for r in recs[20:32] if r["id"] in text]
    assert bad == [r["id"] for r in recs[20:20 + len(bad)]] and len(bad) == len(listed)
    more = [int(n) for n in re.findall(r"\+(\d+)\)", text)]
    assert more == [20 - len(listed), 12 - len(bad)]  # ... and how many more
    assert skipped.as_dict() == {"missing": 20, "corrupt": 12, "missing_ids": listed, "corrupt_ids": bad}

    # exactly as many as are listed: every id, no "+0"
    path2 = make_dataset(tmp_path / "cal2", "calendar", 30)
    recs2 = _lines(path2)
    for r in recs2[:len(listed)]:
        (path2.parent / r["image"]).unlink()
    _, skipped2 = read_adapter_dataset(path2, adapter="calendar")
    text2 = skipped2.summary()
    assert all(r["id"] in text2 for r in recs2[:len(listed)]) and "+" not in text2 and "…" not in text2


def test_one_missing_image_is_reported_when_building(tmp_path):
    reg = _registry(tmp_path / "proj", {"calendar": 6, "claim-window": 6})
    rec = _lines(reg.resolve("data/calendar/train.jsonl"))[2]
    reg.resolve("data/calendar/" + rec["image"]).unlink()
    prog = RecordingProgress()
    out = build_routing_dataset(reg, tmp_path / "ds", progress=prog)
    assert [m for m in prog.messages if "skipped 1 sample" in m and rec["id"] in m]
    meta = json.loads((out / "metadata.json").read_text())
    assert [s["skipped"]["missing"] for s in meta["sources"]] == [1, 0]


def test_defaults_seed_0_no_eval_split_and_a_content_fingerprint(tmp_path):
    from vlrouter.core.data import load_routing_dataset

    reg = _registry(tmp_path / "proj", {"calendar": 8, "claim-window": 8})
    default = build_routing_dataset(reg, tmp_path / "a")
    seed0 = build_routing_dataset(reg, tmp_path / "b", seed=0, eval_samples=0)
    assert sorted(p.name for p in default.iterdir()) == ["metadata.json", "train.jsonl", "val.jsonl"]
    for split in ("train", "val"):
        assert (default / f"{split}.jsonl").read_bytes() == (seed0 / f"{split}.jsonl").read_bytes()
    other = build_routing_dataset(reg, tmp_path / "c", seed=5)
    fp = {name: load_routing_dataset(d).fingerprint() for name, d in (("a", default), ("b", seed0), ("c", other))}
    assert fp["a"] == fp["b"] != fp["c"]  # same samples and split: same fingerprint; others: another


def test_verify_image_refuses_absurd_sizes_from_the_header_and_accepts_the_limits(tmp_path):
    import struct
    import zlib

    from PIL import Image

    from vlrouter.core.data import verify_image

    def png(w: int, h: int) -> Path:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        p = tmp_path / f"{w}x{h}.png"
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
        p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 8))
                      + chunk(b"IEND", b""))
        return p

    for w, h in ((16_385, 1), (1, 16_385), (5213, 12_277)):  # a side over 16384 px; 64,000,001 px
        assert "over the limit" in (verify_image(png(w, h)) or "")
    for w, h in ((16_384, 82), (82, 16_384), (8000, 8000)):  # at the limits (side, pixels; aspect <= 200:1): fine
        assert verify_image(png(w, h)) is None
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    assert verify_image(tmp_path / "dot.png") is None


@pytest.mark.parametrize("names", [["calendar", 3], "calendar,claim-window", ["calendar"]])
def test_routing_metadata_with_bad_class_names_is_refused(tmp_path, names):
    from vlrouter.core.data import load_routing_dataset
    from vlrouter.core.errors import DatasetError

    reg = _registry(tmp_path / "proj", {"calendar": 4, "claim-window": 4})
    out = build_routing_dataset(reg, tmp_path / "ds")
    meta = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**meta, "class_names": names}))
    with pytest.raises(DatasetError, match="class_names"):
        load_routing_dataset(out)


def test_a_non_ascii_prompt_is_written_as_readable_utf8_text(tmp_path):
    reg = _registry(tmp_path, {"calendar": 3, "claim-window": 3})
    src = tmp_path / "data" / "calendar" / "train.jsonl"
    recs = _lines(src)
    prompt = "Klicke auf „Speichern“ – 保存"
    for r in recs:
        r["conversations"][0]["value"] = "<image>\n" + prompt
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = build_routing_dataset(reg, tmp_path / "ds", seed=0)
    text = (out / "train.jsonl").read_text(encoding="utf-8") + (out / "val.jsonl").read_text(encoding="utf-8")
    assert text.count(prompt) == 3  # greppable as written, not \\u escapes


def test_a_sampled_build_reads_only_the_images_it_draws(tmp_path, monkeypatch):
    """--train-samples from a big dataset: images are checked as they are drawn, not all of them up front."""
    from vlrouter.core import data

    reg = _registry(tmp_path, {"calendar": 12, "claim-window": 12})
    checked = []
    real = data.verify_image
    monkeypatch.setattr(data, "verify_image", lambda p: checked.append(Path(p).name) or real(p))
    out = build_routing_dataset(reg, tmp_path / "ds", train_samples=3, seed=0)
    drawn = [Path(r["image"]).name for split in ("train", "val") for r in _lines(out / f"{split}.jsonl")]
    assert len(drawn) == 6 and sorted(checked) == sorted(drawn)


def test_a_decompression_bomb_is_refused_quietly(tmp_path):
    """Over PIL's pixel limit: one reason for the skipped-samples summary, no PIL warning printed beside it."""
    import struct
    import warnings
    import zlib

    from vlrouter.core.data import verify_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"  # 10000 x 10000 = 100M pixels claimed by the header (PIL warns above 89.5M)
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b""))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = verify_image(bomb)
    assert reason and "DecompressionBomb" in reason
    assert not caught, [str(w.message) for w in caught]


def test_the_newest_routing_dataset_is_a_complete_routing_folder(tmp_path):
    from vlrouter.core.data import newest_routing_dataset

    reg = _registry(tmp_path, {"calendar": 3, "claim-window": 3})
    built = build_routing_dataset(reg, tmp_path / "ds", seed=0)
    stamp = "2999-01-01T00:00:00+00:00"  # newer than anything built today
    backup = tmp_path / "ds" / "backup"  # a copy under another name is not a routing dataset
    backup.mkdir()
    (backup / "metadata.json").write_text(json.dumps({"created_at": stamp}))
    half = tmp_path / "ds" / "routing_29990101_000000"  # a build that never wrote its metadata
    half.mkdir()
    (half / "train.jsonl").write_text("")
    assert newest_routing_dataset(tmp_path / "ds") == built


def test_a_routing_dataset_folder_gets_ordinary_folder_permissions(tmp_path):
    """It is built in a private temp folder (0700); the finished one is readable like any other (a shared volume,
    another user's `router eval`)."""
    import stat

    reg = _registry(tmp_path, {"calendar": 3, "claim-window": 3})
    out = build_routing_dataset(reg, tmp_path / "ds", seed=0)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
