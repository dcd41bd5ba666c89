"""Hostile files: pickles where weights belong, a seed checkpoint whose pickle runs code, image bombs.

Nothing here may execute code from a file or allocate what a file's header claims:
* ``head.safetensors`` that is really a pickle is refused (safetensors only) -- through
  the engine and through `router route`;
* `router import-seed-head` reads the seed's ``router-head.pt`` with
  ``torch.load(weights_only=True)``; a pickle whose ``__reduce__`` would run code is
  refused and the code never runs (a control run with ``weights_only=False`` in a
  subprocess proves the payload is live);
* a PNG or JPEG whose header claims 100000x100000 pixels is refused from the header,
  in milliseconds and without allocating the pixels -- through ``open_image``, the
  engine, `router act` and dataset reading.
"""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vlrouter.cli.main  # noqa: F401  (attaches every command to the app)
from tests import engine_helpers as H
from vlrouter.cli.app import app
from vlrouter.core.errors import CheckpointError, ImageError
from vlrouter.core.head import HeadShape, build_head
from vlrouter.core.images import open_image
from vlrouter.core.seed_import import import_seed_head
from vlrouter.core.store import RouterMeta, load_router, save_router

SEED_ADAPTERS = ["calendar", "claim-window", "provider-select"]


def router(*args: str):
    return CliRunner().invoke(app, list(args), env={"VLROUTER_DEBUG": "", "COLUMNS": "200", "VLROUTER_PROGRESS": "0"})


def _one_error_line(res) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


class Payload:
    """Unpickling this runs ``exec``: it writes a marker file. Pickled, it is a call to builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


# ---- a pickle where head.safetensors belongs ------------------------------------------------------

@pytest.fixture
def pickled_head_project(tmp_path) -> tuple[Path, Path]:
    """A registry whose router folder has a valid router.json and a torch.save pickle as head.safetensors."""
    marker = tmp_path / "marker"
    reg = H.write_registry(tmp_path / "p", "Qwen/Qwen3-VL-8B-Instruct", {n: f"checkpoints/{n}" for n in SEED_ADAPTERS})
    shape = HeadShape(in_dim=8, num_labels=3)
    head = build_head(shape)
    router_dir = tmp_path / "p" / "runs" / "router"
    save_router(router_dir, head, RouterMeta(adapters=SEED_ADAPTERS, base_model="Qwen/Qwen3-VL-8B-Instruct",
                                             pooling="mean", layer=-1, hidden_size=8, head=shape))
    torch.save({"state_dict": head.state_dict(), "payload": Payload(marker)}, router_dir / "head.safetensors")
    return reg, marker


def test_a_pickle_as_head_safetensors_is_refused_by_the_engine_and_never_unpickled(pickled_head_project):
    from vlrouter.core.engine import Engine

    reg, marker = pickled_head_project
    with pytest.raises(CheckpointError) as e:
        Engine.from_registry(reg, device="cpu")
    msg = str(e.value)
    assert "head.safetensors" in msg and "a torch.save zip archive (pickle inside)" in msg
    assert "never from pickles" in msg and "router import-seed-head" in msg and "\n" not in msg
    assert not marker.exists()
    # a raw pickle (not torch's zip format) is named as such
    head_file = reg.parent / "runs" / "router" / "head.safetensors"
    head_file.write_bytes(pickle.dumps({"payload": Payload(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="a Python pickle; refusing to load it"):
        load_router(head_file.parent)
    assert not marker.exists()


def test_a_pickle_as_head_safetensors_through_router_route_is_one_error_line(pickled_head_project, tmp_path):
    reg, marker = pickled_head_project
    img = tmp_path / "screen.png"
    H.screen("calendar").save(img)
    line = _one_error_line(router("route", str(img), "Click March 29", "--registry", str(reg)))
    assert "head.safetensors" in line and "pickle" in line and "(fix: " in line
    assert not marker.exists()


# ---- router import-seed-head ---------------------------------------------------------------------

def _seed_file(path: Path, module: torch.nn.Module, **extra) -> Path:
    torch.save({"state_dict": module.state_dict(), "adapters": SEED_ADAPTERS,
                "base_model_id": "Qwen/Qwen3-VL-8B-Instruct",
                "best_loss": 0.25, "best_acc": 0.9, **extra}, path)
    return path


def test_a_malicious_seed_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "marker"
    pt = _seed_file(tmp_path / "router-head.pt", torch.nn.Linear(16, 3), payload=Payload(marker))
    # control: a plain torch.load (what the seed did) runs the payload -- in a child process
    control = tmp_path / "control-marker"
    evil_control = _seed_file(tmp_path / "control.pt", torch.nn.Linear(16, 3), payload=Payload(control))
    code = f"import torch; torch.load({str(evil_control)!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120,
                   cwd=Path(__file__).resolve().parents[2])
    assert control.read_text() == "pwned"

    with pytest.raises(CheckpointError) as e:
        import_seed_head(pt, tmp_path / "out", pooling="mean")
    msg = str(e.value)
    assert "refused: the pickle calls or builds exec" in msg and "nothing in the file was executed" in msg
    assert "\n" not in msg
    assert not marker.exists() and not (tmp_path / "out").exists()

    line = _one_error_line(router("import-seed-head", str(pt), "--out", str(tmp_path / "out"), "--pooling", "mean"))
    assert "refused" in line and "router-head.pt" in line
    assert not marker.exists() and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folder left


def test_import_seed_head_maps_a_linear_head_exactly_and_says_it_needs_retraining(tmp_path):
    torch.manual_seed(0)
    seed = torch.nn.Linear(16, 3)
    pt = _seed_file(tmp_path / "router-head.pt", seed)
    res = router("import-seed-head", str(pt), "--out", str(tmp_path / "imported"), "--pooling", "last",
                 "--layer", "-2", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["needs_retraining"] is True and "token 0" in report["warning"]
    head, meta = load_router(tmp_path / "imported")
    assert (meta.adapters, meta.pooling, meta.layer, meta.hidden_size) == (SEED_ADAPTERS, ["last"], -2, 16)
    assert meta.base_model == "Qwen/Qwen3-VL-8B-Instruct" and meta.head.kind == "linear"
    assert torch.equal(head[0].mean, torch.zeros(16)) and torch.equal(head[0].std, torch.ones(16))
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x), seed(x))
    m = meta.metrics
    assert m["needs_retraining"] is True and m["seed_pooling"] == "token0" and "token 0" in m["warning"]
    assert (meta.best_acc, m["seed_best_acc"], m["seed_best_loss"]) == (None, 0.9, 0.25)


def test_import_seed_head_sequential_mlp_and_overrides(tmp_path):
    torch.manual_seed(1)
    seq = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
    torch.save({"module." + k: v for k, v in seq.state_dict().items()}, tmp_path / "bare.pt")  # a bare, wrapped dict
    out = import_seed_head(tmp_path / "bare.pt", tmp_path / "mlp", pooling="mean", base_model="m",
                           adapters=["calendar", "search"])
    head, meta = load_router(out)
    assert meta.head.kind == "mlp" and meta.head.hidden == 8 and meta.adapters == ["calendar", "search"]
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(head(x), seq(x))


IMPORT_REFUSALS = {
    "no-pooling": "--pooling: required",
    "out-exists": "already exists and is not an empty folder",
    "layernorm": "is not an nn.Linear",
    "wrong-adapter-count": "2 adapter names for a head with 3 outputs",
    "not-torch": "cannot read it as a torch checkpoint",
    "missing": "seed checkpoint not found",
}


@pytest.mark.parametrize("case", list(IMPORT_REFUSALS), ids=list(IMPORT_REFUSALS))
def test_import_seed_head_refusals_are_one_line_and_write_nothing(tmp_path, case):
    expected = IMPORT_REFUSALS[case]
    pt = _seed_file(tmp_path / "router-head.pt", torch.nn.Linear(16, 3))
    args = ["import-seed-head", str(pt), "--out", str(tmp_path / "out"), "--pooling", "mean"]
    if case == "no-pooling":
        args = args[:-2]
    elif case == "out-exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
    elif case == "layernorm":
        _seed_file(pt, torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Linear(16, 3)))
    elif case == "wrong-adapter-count":
        args += ["--adapters", "a,b"]
    elif case == "not-torch":
        pt.write_bytes(b"not a torch file at all")
    elif case == "missing":
        pt.unlink()
    before = sorted(p.name for p in tmp_path.iterdir())
    line = _one_error_line(router(*args))
    assert expected in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "out-exists":
        assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_imported_head_loads_into_the_engine(engine_project, tmp_path, tiny_encoder):
    """Migration: a seed head of the right width, imported, is a router the engine accepts (it needs retraining)."""
    import shutil

    from vlrouter.core.engine import Engine

    root = tmp_path / "p"
    shutil.copytree(engine_project.parent, root, symlinks=True)
    hidden = tiny_encoder.hidden_size
    pt = _seed_file(tmp_path / "router-head.pt", torch.nn.Linear(hidden, 3))
    live = root / "runs" / "router"
    shutil.rmtree(live) if not live.is_symlink() else live.unlink()
    import_seed_head(pt, live, pooling="mean", base_model=str(tiny_encoder.base_model), adapters=list(H.NAMES))
    route = Engine.from_registry(root / "registry.yaml", device="cpu").route(*H.samples()[0][:2])
    assert route.adapter in H.NAMES and abs(sum(route.probs.values()) - 1) < 1e-5


# ---- image bombs and absurd sizes ---------------------------------------------------------------------

def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose IHDR claims ``width`` x ``height`` RGB pixels; tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A JPEG start (SOI + baseline SOF0 header) claiming ``width`` x ``height``."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, height, width, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


BOMBS = {
    "png-100000x100000": (lambda: png_claiming(100_000, 100_000), "refused before decoding"),
    "jpeg-65000x65000": (lambda: jpeg_claiming(65_000, 65_000), "refused before decoding"),
    "png-20000x10-one-side-too-long": (lambda: png_claiming(20_000, 10), "over the limit"),
}


@pytest.mark.parametrize("bomb", list(BOMBS), ids=list(BOMBS))
def test_an_absurd_image_size_is_refused_from_the_header_fast(tmp_path, bomb):
    make, expected = BOMBS[bomb]
    path = tmp_path / "bomb.img"
    path.write_bytes(make())
    rss = _rss_mb()
    t0 = time.perf_counter()
    for source in (path, path.read_bytes()):
        with pytest.raises(ImageError, match=expected):
            open_image(source)
    assert time.perf_counter() - t0 < 1.0
    assert _rss_mb() - rss < 50  # decoding 100000x100000 RGB would need 30 GB


def test_an_image_bomb_through_engine_act_and_router_act(engine, engine_project, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(100_000, 100_000))
    rss = _rss_mb()
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="bomb.png.*refused before decoding.*fix: downscale"):
        engine.act(bomb, "Click March 29")
    with pytest.raises(ImageError, match="refused before decoding"):
        engine.act(bomb.read_bytes(), "Click March 29")
    with pytest.raises(ImageError, match="item 1 image.*refused before decoding"):
        engine.act_batch([(H.screen("calendar"), "Click"), (bomb.read_bytes(), "Click")])
    assert time.perf_counter() - t0 < 2.0 and _rss_mb() - rss < 50
    line = _one_error_line(router("act", str(bomb), "Click March 29", "--registry", str(engine_project)))
    assert "refused before decoding" in line and "bomb.png" in line


def test_an_image_bomb_in_a_dataset_is_skipped_as_corrupt_without_decoding(tmp_path):
    from vlrouter.core.data import read_adapter_dataset

    path = tmp_path / "train.jsonl"
    (tmp_path / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    H.screen("calendar").save(tmp_path / "ok.png")
    lines = [{"id": i, "image": img, "conversations": [{"from": "human", "value": "<image>\nClick"},
                                                        {"from": "gpt", "value": "click(x=1, y=2)"}]}
             for i, img in (("bomb", "bomb.png"), ("ok", "ok.png"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rss = _rss_mb()
    t0 = time.perf_counter()
    samples, skipped = read_adapter_dataset(path, adapter="calendar")
    assert time.perf_counter() - t0 < 1.0 and _rss_mb() - rss < 50
    assert [s.id for s in samples] == ["ok"] and skipped.corrupt == ["bomb"]
    assert "1 corrupt image (id bomb)" in skipped.summary()
