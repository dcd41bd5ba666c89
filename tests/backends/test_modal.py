"""The Modal backend, offline: app definition, resources, function bodies via .local(), credentials.

Modal's cloud is unreachable here (and in CI): nothing in this file opens a connection
to it. The app module must import with sockets blocked; the function bodies run
in-process with ``.local()`` against temporary roots standing in for the volumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import make_registry
from vlrouter.backends import modal_run
from vlrouter.core.errors import BackendError
from vlrouter.core.options import resolve_options
from vlrouter.core.progress import RecordingProgress
from vlrouter.core.recipe import RetrainRequest, SplitFeatures

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
ROUTER = str(Path(sys.executable).with_name("router"))

# https://modal.com/docs/guide/gpu ("Specifying GPU type"), as of modal 1.x.
MODAL_GPU_TYPES = {"T4", "L4", "A10", "A10G", "L40S", "A100", "A100-40GB", "A100-80GB", "RTX-PRO-6000",
                   "H100", "H100!", "H200", "B200", "B200+"}
MODAL_MAX_TIMEOUT = 24 * 60 * 60  # Modal's limit on a function's timeout
MODAL_MAX_RETRIES = 10
FUNCTIONS = ("process_shard", "embed", "train")
# .local() runs a body in this process, away from the volumes: expected here, said once per call by Modal.
pytestmark = pytest.mark.filterwarnings("ignore:The .* function is executing locally:UserWarning")
ROOT_PARAMS = {"data_root": "/data", "output_root": "/output", "checkpoints_root": "/checkpoints"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_TOKEN", "MODAL_OAUTH", "MODAL_PROFILE",
                                                                     "VLROUTER_MODAL"))}
    env.update(extra)
    return env


@pytest.fixture
def mapp():
    """The app module with its default settings (re-imported if a test changed them)."""
    return modal_run.load_app(_default_settings())


def _default_settings() -> dict[str, str]:
    return {modal_run.ENV_APP: "vlrouter", modal_run.ENV_DATA_VOLUME: "moe-lora-data",
            modal_run.ENV_OUTPUT_VOLUME: "routing-output", modal_run.ENV_CHECKPOINTS_VOLUME: "moe-lora-checkpoints",
            modal_run.ENV_GPU: "H100"}


# ---- the app module ---------------------------------------------------------------------------

def test_app_module_imports_and_defines_everything_with_sockets_blocked(tmp_path):
    script = textwrap.dedent("""
        import socket, sys

        def refuse(*a, **k):
            raise OSError("network blocked by the test")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        import importlib, warnings, modal
        warnings.simplefilter("error")  # nothing deprecated on the way
        import vlrouter.backends.modal_app as m
        m = importlib.reload(m)
        assert isinstance(m.app, modal.App), m.app
        assert m.app.name == "vlrouter", m.app.name
        # Modal's supported way to reach an app's functions: the module-level objects its decorators return
        # (App.registered_functions is deprecated and leaves in modal 1.7).
        functions = sorted(k for k, v in vars(m).items() if isinstance(v, modal.Function))
        for name in ("process_shard", "embed", "train"):
            fn = getattr(m, name)
            assert isinstance(fn, modal.Function), (name, fn)
        print("ok", functions)
    """)
    env = _env(MODAL_CONFIG_PATH=str(tmp_path / "none.toml"))
    r = subprocess.run([PYTHON, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok ['embed', 'process_shard', 'train']" in r.stdout


def test_volume_and_app_names_follow_the_environment_set_before_import():
    custom = {**_default_settings(), modal_run.ENV_APP: "my-router", modal_run.ENV_DATA_VOLUME: "my-data",
              modal_run.ENV_OUTPUT_VOLUME: "my-out", modal_run.ENV_CHECKPOINTS_VOLUME: "my-ck",
              modal_run.ENV_GPU: "A100-80GB"}
    before = {k: os.environ.get(k) for k in custom}
    try:
        m = modal_run.load_app(custom)
        assert m.app.name == "my-router"
        assert {k: v.name for k, v in m.VOLUMES.items()} == {"/data": "my-data", "/output": "my-out",
                                                             "/checkpoints": "my-ck"}
        assert m.RESOURCES["embed"]["gpu"] == "A100-80GB" and "gpu" not in m.RESOURCES["train"]
        assert m.CONTAINER_ENV[modal_run.ENV_DATA_VOLUME] == "my-data"  # containers define the same app
        assert {k: os.environ.get(k) for k in custom} == before  # set only around the import
    finally:
        m = modal_run.load_app(_default_settings())
    assert {k: v.name for k, v in m.VOLUMES.items()} == {"/data": "moe-lora-data", "/output": "routing-output",
                                                         "/checkpoints": "moe-lora-checkpoints"}
    assert m.app.name == "vlrouter"


def test_app_settings_come_from_the_registry_modal_section(tmp_path):
    from vlrouter.core.registry import Registry

    p = tmp_path / "registry.yaml"
    p.write_text("base_model: x\nmodal:\n  app_name: r2\n  data_volume: d2\n  output_volume: o2\n"
                 "  checkpoints_volume: c2\n  gpu: l40s\n  cpu_shards: 3\nadapters: []\n")
    reg = Registry.load(p)
    s = modal_run.app_settings(reg)
    assert s == {modal_run.ENV_APP: "r2", modal_run.ENV_DATA_VOLUME: "d2", modal_run.ENV_OUTPUT_VOLUME: "o2",
                 modal_run.ENV_CHECKPOINTS_VOLUME: "c2", modal_run.ENV_GPU: "L40S"}
    assert modal_run.app_settings(reg, "h200")[modal_run.ENV_GPU] == "H200"  # --gpu wins
    with pytest.raises(BackendError, match="--gpu: unknown Modal GPU 'V100'"):
        modal_run.app_settings(reg, "V100")


@pytest.mark.parametrize("gpu,ok", [("H100", "H100"), ("h100", "H100"), ("A100-80GB:2", "A100-80GB:2"),
                                    ("B200+", "B200+"), ("H100:0", None), ("H100:9", None), ("K80", None),
                                    ("", None)])
def test_validate_gpu(gpu, ok):
    if ok:
        assert modal_run.validate_gpu(gpu) == ok
    else:
        with pytest.raises(BackendError, match="unknown Modal GPU"):
            modal_run.validate_gpu(gpu)


def test_resource_dicts_are_valid_modal_settings(mapp):
    assert set(mapp.RESOURCES) == set(FUNCTIONS) == set(mapp.MOUNTS)
    for name, res in mapp.RESOURCES.items():
        assert 0 < res["timeout"] <= MODAL_MAX_TIMEOUT, name
        assert 0 <= res.get("retries", 0) <= MODAL_MAX_RETRIES, name
        assert res["cpu"] > 0 and res["memory"] >= 1024, name
        if "gpu" in res:
            assert res["gpu"].partition(":")[0] in MODAL_GPU_TYPES, (name, res["gpu"])
    assert "gpu" not in mapp.RESOURCES["process_shard"]  # preprocessing runs on CPU containers
    assert "gpu" not in mapp.RESOURCES["train"]  # head training: one CPU thread on cached features
    assert mapp.RESOURCES["embed"]["gpu"] == "H100"  # the default
    assert set(mapp.VOLUMES) == {"/data", "/output", "/checkpoints"}
    assert set(modal_run.KNOWN_GPUS) == MODAL_GPU_TYPES


def test_every_root_a_body_defaults_to_is_mounted_on_that_function(mapp):
    for name in FUNCTIONS:
        fn = getattr(mapp, name)
        sig = inspect.signature(_raw(fn))
        roots = {p: sig.parameters[p].default for p in ROOT_PARAMS if p in sig.parameters}
        assert roots, f"{name} takes no root parameter"
        for param, default in roots.items():
            assert default == ROOT_PARAMS[param], (name, param, default)
            assert default in mapp.MOUNTS[name], f"{name} reads/writes {default} but does not mount it"
            assert default in mapp.VOLUMES
        assert set(mapp.MOUNTS[name]) == set(roots.values()), f"{name} mounts a volume it never uses"


def _raw(fn):
    """The Python function behind a modal.Function (what .local() runs)."""
    get = getattr(fn, "get_raw_f", None)
    return get() if get is not None else fn._get_source_info().raw_f


def test_decorators_read_the_dicts(mapp):
    """What Modal will provision is what RESOURCES/MOUNTS say (read from the Function's spec)."""
    for name in FUNCTIONS:
        spec = getattr(getattr(mapp, name), "_spec_", None)
        if spec is None:
            pytest.skip("this modal version keeps the function spec elsewhere")
        res = mapp.RESOURCES[name]
        assert spec.gpus == res.get("gpu"), name
        assert spec.cpu == res["cpu"] and spec.memory == res["memory"], name
        assert set(map(str, spec.volumes)) == set(mapp.MOUNTS[name]), name
        assert all(spec.volumes[m].name == mapp.VOLUMES[m].name for m in mapp.MOUNTS[name]), name
        opts = mapp.function_options(name)
        assert opts["timeout"] == res["timeout"] and opts["retries"] == res["retries"]


def test_image_installs_the_project_dependencies_pinned_to_the_versions_tested_here(mapp):
    import importlib.metadata

    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("<")[0].split("=")[0].strip().lower() for d in deps}
    names -= {"modal", "matplotlib"}  # the client; plots are drawn locally
    pins = dict(p.split("==") for p in mapp.PIP_PACKAGES)
    assert set(pins) == names and len(pins) == len(mapp.PIP_PACKAGES), names ^ set(pins)
    for name, version in pins.items():  # the cloud computes with exactly what the suite ran with
        assert version == importlib.metadata.version(name).split("+")[0], name


def test_modal_floor_is_the_first_release_with_function_env():
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [modal_dep] = [d for d in deps if d.startswith("modal")]
    assert modal_dep == "modal>=1.2"  # @app.function(env=...), which the app uses, arrived in 1.2
    from modal import App

    assert "env" in inspect.signature(App.function).parameters


# ---- upload layout --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir):
    """A registry with three synthetic adapters and a routing dataset built from it."""
    from vlrouter.core.data import build_routing_dataset
    from vlrouter.core.registry import Registry

    root = tmp_path_factory.mktemp("modal-project")
    reg = Registry.load(make_registry(root, tiny_model_dir, n=12))
    ds = build_routing_dataset(reg, root / "datasets", val_fraction=0.25, seed=0)
    return reg, ds


def test_upload_plan_is_self_contained(project, tmp_path):
    from vlrouter.core.data import load_routing_dataset

    reg, ds = project
    name, plan = modal_run.dataset_upload_plan(ds)
    assert name == ds.name
    rels = [rel for rel, _ in plan]
    assert {"train.jsonl", "val.jsonl", "metadata.json"} <= set(rels)
    assert all(not rel.startswith(("/", "..")) and ".." not in rel.split("/") for rel in rels)
    staged = modal_run.stage_dataset(ds, tmp_path)
    local, remote = load_routing_dataset(ds), load_routing_dataset(tmp_path / "datasets" / staged)
    for split in ("train", "val"):
        a, b = local.split(split), remote.split(split)
        assert [(s.id, s.label, s.adapter, s.prompt) for s in a] == [(s.id, s.label, s.adapter, s.prompt) for s in b]
        for sa, sb in zip(a, b):
            assert Path(sb.image).is_relative_to(tmp_path)
            assert Path(sb.image).read_bytes() == Path(sa.image).read_bytes()
    assert remote.metadata["upload"]["source_fingerprint"] == local.fingerprint()
    assert remote.class_names == reg.adapter_names


class FakeVolume:
    """A local folder behind the parts of modal.Volume's API the driver uses.

    Like Modal's, a batch only queues files in ``put_file``; they are transferred (written,
    and listed in ``landed``) when the batch's ``with`` block ends.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.puts: list[str] = []
        self.landed: list[str] = []
        self.batches = 0

    def batch_upload(self, force: bool = False):
        vol = self

        class _Batch:
            def __init__(self):
                self.queued = []

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                if exc[0] is None:
                    for src, remote in self.queued:
                        target = vol.root / remote.lstrip("/")
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(src.read() if hasattr(src, "read") else Path(src).read_bytes())
                        vol.landed.append(remote)
                    vol.batches += 1
                return False

            def put_file(self, src, remote):
                vol.puts.append(remote)
                self.queued.append((src, remote))

        return _Batch()

    def listdir(self, path, recursive=False):
        from modal.volume import FileEntry, FileEntryType

        base = self.root / path.strip("/")
        if not base.exists():
            raise FileNotFoundError(path)
        found = base.rglob("*") if recursive else base.iterdir()
        return [FileEntry(path=str(p.relative_to(self.root)),
                          type=FileEntryType.FILE if p.is_file() else FileEntryType.DIRECTORY,
                          mtime=0, size=p.stat().st_size) for p in found]

    def read_file(self, path):
        yield (self.root / path.strip("/")).read_bytes()


def test_upload_dataset_puts_every_file_under_datasets(project, tmp_path, mapp, monkeypatch):
    reg, ds = project
    vol = FakeVolume(tmp_path / "vol")
    monkeypatch.setitem(mapp.VOLUMES, mapp.DATA_ROOT, vol)
    where = modal_run.upload_dataset(reg, ds, mapp=mapp, progress=RecordingProgress())
    assert where == f"moe-lora-data:/datasets/{ds.name}/"
    assert all(p.startswith(f"/datasets/{ds.name}/") for p in vol.puts)
    assert (vol.root / "datasets" / ds.name / "metadata.json").is_file()


def test_a_local_base_model_is_uploaded_once_a_hub_id_is_not(tiny_model_dir, tmp_path, mapp, monkeypatch):
    vol = FakeVolume(tmp_path / "vol")
    monkeypatch.setitem(mapp.VOLUMES, mapp.DATA_ROOT, vol)
    assert modal_run.remote_base_model(mapp, "Qwen/Qwen3-VL-8B-Instruct") == "Qwen/Qwen3-VL-8B-Instruct"
    assert vol.puts == []
    where = modal_run.remote_base_model(mapp, str(tiny_model_dir))
    assert where.startswith("/data/models/") and vol.puts
    assert where.endswith("/" + Path(tiny_model_dir).name)  # the folder's name, which LoRA configs are checked against
    remote = vol.root / where.removeprefix("/data/")
    assert (remote / "config.json").read_bytes() == (Path(tiny_model_dir) / "config.json").read_bytes()
    n = len(vol.puts)
    assert modal_run.remote_base_model(mapp, str(tiny_model_dir)) == where and len(vol.puts) == n  # once


def test_the_upload_bar_counts_files_that_reached_the_volume_not_files_queued(project, tmp_path, mapp, monkeypatch):
    reg, ds = project
    vol = FakeVolume(tmp_path / "vol")
    monkeypatch.setitem(mapp.VOLUMES, mapp.DATA_ROOT, vol)
    monkeypatch.setattr(modal_run, "UPLOAD_BATCH_FILES", 4)
    done = []

    class Watching(RecordingProgress):
        @contextlib.contextmanager
        def task(self, description, total=None):
            class _T:
                def advance(self, n=1):
                    done.append(n)
                    assert sum(done) <= len(vol.landed), (sum(done), len(vol.landed))  # never ahead of transfers

            yield _T()
            self.tasks.append((description, total, sum(done)))

    prog = Watching()
    modal_run.upload_dataset(reg, ds, mapp=mapp, progress=prog)
    [(what, total, advanced)] = prog.tasks
    assert total == advanced == len(vol.landed) == len(vol.puts) and vol.batches == -(-total // 4) > 1
    assert what.startswith(f"uploading {ds.name} to volume moe-lora-data (") and what.endswith(" MB)")
    big = [("a", b"x" * 10), ("b", b"y" * 10), ("c", b"z")]
    monkeypatch.setattr(modal_run, "UPLOAD_BATCH_BYTES", 15)
    assert [[r for r, _ in part] for part in modal_run.upload_batches(big)] == [["a"], ["b", "c"]]


def test_a_gpu_that_cannot_hold_the_base_model_is_refused_before_anything_runs(tmp_path, tiny_model_dir):
    from vlrouter.core.registry import Registry

    p = tmp_path / "registry.yaml"
    p.write_text("base_model: Qwen/Qwen3-VL-8B-Instruct\nmodal:\n  gpu: T4\nadapters: []\n")
    reg = Registry.load(p)
    refused = (r"registry.yaml:3: modal.gpu: GPU T4 has 16 GB, but Qwen/Qwen3-VL-8B-Instruct needs about 20.3 GB "
               r"\(17.5 GB of bfloat16 weights.*\(fix: choose a larger GPU, e.g. L4, L40S, A100-80GB, with modal.gpu "
               r"in registry.yaml\)")
    with pytest.raises(BackendError, match=refused):
        modal_run.check_gpu_fits("T4", reg, field="modal.gpu", line=reg.line_of(("modal", "gpu")))
    assert modal_run.check_gpu_fits("L4", reg, field="--gpu").startswith("L4 (24 GB) holds 17.5 GB")
    assert modal_run.check_gpu_fits("H100:2", reg, field="--gpu").startswith("H100 (80 GB)")
    with pytest.raises(BackendError, match=r"^--gpu: GPU L4 has 24 GB.*35.1 GB of float32"):  # fp32 doubles it
        modal_run.check_gpu_fits("L4", reg, field="--gpu", dtype="float32")
    p.write_text(f"base_model: {tiny_model_dir}\nadapters: []\n")  # a local folder: counted from its headers
    assert "counted in" in modal_run.check_gpu_fits("T4", Registry.load(p), field="--gpu")
    p.write_text("base_model: acme/other-vlm\nadapters: []\n")
    assert modal_run.check_gpu_fits("T4", Registry.load(p), field="--gpu").startswith("GPU memory not checked")
    assert set(modal_run.GPU_MEMORY_GB) == set(modal_run.KNOWN_GPUS)


def test_retrain_with_a_too_small_gpu_fails_before_connecting(live_project, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    reg = live_project
    reg.path.write_text(reg.path.read_text().replace(f"base_model: {reg.model.base_model}",
                                                     "base_model: Qwen/Qwen3-VL-32B-Instruct"))
    from vlrouter.core.registry import Registry

    reg = Registry.load(reg.path)
    prog = RecordingProgress()
    with pytest.raises(BackendError, match=r"^--gpu: GPU L40S has 48 GB, but Qwen/Qwen3-VL-32B-Instruct needs"):
        modal_run.retrain_modal(RetrainRequest(reg, resolve_options(reg, {"gpu": "L40S"}), progress=prog))
    assert prog.messages == []  # refused before "Connecting to Modal…"


def test_modal_failures_become_one_line_backend_errors():
    import modal.exception as mexc

    e = modal_run._modal_error("embedding on H100", mexc.AuthError("Token invalid"))
    assert "modal token new" in str(e)
    e = modal_run._modal_error("uploading the dataset", mexc.ConnectionError("Could not connect"))
    assert str(e).startswith("lost the connection to Modal while uploading the dataset")
    e = modal_run._modal_error("training the head on H100", RuntimeError("CUDA out of memory\nmore"))
    assert "\n" not in str(e) and "RuntimeError: CUDA out of memory" in str(e)


# ---- the function bodies, in-process, against temp roots --------------------------------------

def test_function_bodies_with_local_make_the_same_router_as_the_local_backend(project, tmp_path, mapp):
    import shutil

    import torch

    from vlrouter.backends.local import retrain_local
    from vlrouter.core.store import load_router, new_version_dir

    reg, _ = project
    opts = resolve_options(reg)
    local = retrain_local(RetrainRequest(registry=reg, options=opts))
    ds_dir = local.dataset_dir

    data, out, ck = tmp_path / "data", tmp_path / "output", tmp_path / "checkpoints"
    name = modal_run.stage_dataset(ds_dir, data)
    shards = [mapp.process_shard.local(k, num_shards=3, dataset=name, base_model=opts.base_model, data_root=str(data))
              for k in range(3)]
    assert sum(s["processed"] for s in shards) == sum(s["samples"] for s in shards) > 0
    again = mapp.process_shard.local(0, num_shards=3, dataset=name, base_model=opts.base_model, data_root=str(data))
    assert again["processed"] == 0 and again["reused"] == shards[0]["samples"]  # resumable
    info = mapp.embed.local(name, "run1", opts.base_model, layer=opts.layer, dtype=opts.dtype,
                            batch_size=opts.embed_batch_size, workers=1, data_root=str(data))
    assert info["embedded_new"] == info["samples"] and info["reused_cached"] == 0
    tstats = mapp.train.local(name, "run1", opts.model_dump(mode="json"), info,
                              registry_fingerprint=reg.fingerprint(),
                              data_root=str(data), output_root=str(out), checkpoints_root=str(ck))
    remote_dir = out / tstats["router_path"]
    assert (remote_dir / "head.safetensors").is_file() and (remote_dir / "router.json").is_file()
    assert tstats["checkpoints_on_volume"] == {n: False for n in reg.adapter_names}

    head_a, meta_a = load_router(local.dir)
    head_b, meta_b = load_router(remote_dir)
    assert meta_a.adapters == meta_b.adapters == reg.adapter_names
    assert meta_a.encoder_fingerprint == meta_b.encoder_fingerprint
    assert meta_b.base_model == meta_a.base_model
    assert meta_b.temperature == pytest.approx(meta_a.temperature, rel=1e-4)
    x = torch.randn(16, meta_a.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(head_a(x), head_b(x), atol=1e-5)
    assert meta_b.metrics["val_acc"] == pytest.approx(meta_a.metrics["val_acc"])

    # The download + fix-up the driver does after `train`, against a stand-in volume.
    cand = new_version_dir(reg.router_dir)
    try:
        modal_run.download_dir(FakeVolume(out), tstats["router_path"], cand)
        features = SplitFeatures.from_file(data / info["features"])
        features.stats.update(embedded_new=info["embedded_new"], reused_cached=info["reused_cached"])
        candidate = modal_run.finish_candidate(cand, features, dataset_dir=ds_dir, modal_info={"run_id": "run1"})
        _, meta_c = load_router(cand)
        assert meta_c.dataset_fingerprint == meta_a.dataset_fingerprint  # the local dataset, not the upload
        assert meta_c.metrics["dataset_dir"] == str(ds_dir)
        assert meta_c.embedded_new == info["embedded_new"] and meta_c.metrics["modal"] == {"run_id": "run1"}
        assert candidate.meta.metrics["val_acc"] == meta_a.metrics["val_acc"]
        assert candidate.val_views.keys() == local.val_views.keys()  # the gate scores the same samples
        assert all(torch.equal(candidate.val_views[k], local.val_views[k]) for k in local.val_views)
        assert candidate.val_labels == local.val_labels
        assert (cand / "tensorboard").is_dir()

        # A second embed finds everything in the feature cache on the volume.
        again = mapp.embed.local(name, "run2", opts.base_model, layer=opts.layer,
                                 dtype=opts.dtype, batch_size=opts.embed_batch_size, workers=1, data_root=str(data))
        assert again["embedded_new"] == 0 and again["reused_cached"] == info["samples"]
    finally:
        shutil.rmtree(cand, ignore_errors=True)
        shutil.rmtree(local.dir, ignore_errors=True)


def test_train_refuses_a_missing_features_file_with_its_path(project, tmp_path, mapp):
    from vlrouter.core.errors import TrainingError

    reg, ds = project
    opts = resolve_options(reg)
    data = tmp_path / "data"
    name = modal_run.stage_dataset(ds, data)
    info = {"features": "features/runs/never-embedded.safetensors"}
    with pytest.raises(TrainingError, match="never-embedded.safetensors: no usable features file") as e:
        mapp.train.local(name, "r", opts.model_dump(mode="json"), info, data_root=str(data),
                         output_root=str(tmp_path / "out"), checkpoints_root=str(tmp_path / "ck"))
    assert "run the embed step again" in str(e.value)
    assert not (tmp_path / "out" / "routers" / "r").exists()


# ---- credentials and connectivity -----------------------------------------------------------

def _tree_bytes(path: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(path))] = b"->" + os.readlink(p).encode()
        elif p.is_file():
            out[str(p.relative_to(path))] = p.read_bytes()
    return out


@pytest.fixture
def live_project(tmp_path, tiny_model_dir):
    """A registry with a live router (a symlink into .router.versions), as after a local retrain."""
    import torch

    from vlrouter.core.head import HeadShape, build_head
    from vlrouter.core.registry import Registry
    from vlrouter.core.store import RouterMeta, new_version_dir, promote, save_router

    reg = Registry.load(make_registry(tmp_path / "proj", tiny_model_dir, n=3))
    shape = HeadShape(in_dim=64, num_labels=3)
    torch.manual_seed(0)
    head = build_head(shape)
    meta = RouterMeta(adapters=reg.adapter_names, base_model=reg.base_model, pooling=["mean"], layer=-1,
                      hidden_size=64, head=shape)
    promote(save_router(new_version_dir(reg.router_dir), head, meta), reg.router_dir)
    return reg


def test_missing_credentials_fail_fast_in_process(live_project, monkeypatch):
    for k in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(k, raising=False)
    before = _tree_bytes(live_project.root)
    prog = RecordingProgress()
    t0 = time.perf_counter()
    with pytest.raises(BackendError) as e:
        modal_run.retrain_modal(RetrainRequest(live_project, resolve_options(live_project), progress=prog))
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0, elapsed
    assert str(e.value).startswith("Modal credentials not found")
    assert "modal token new" in str(e.value) and "MODAL_TOKEN_ID and MODAL_TOKEN_SECRET" in str(e.value)
    assert prog.messages == []  # not even "Connecting…"
    assert _tree_bytes(live_project.root) == before


def test_missing_credentials_end_to_end_through_the_cli(live_project, tmp_path):
    reg = live_project
    empty = tmp_path / "empty-modal.toml"
    empty.write_text("")
    registry_bytes = reg.path.read_bytes()
    live_before = _tree_bytes(reg.router_dir.resolve())
    link_before = os.readlink(reg.router_dir)
    env = _env(MODAL_CONFIG_PATH=str(empty), VLROUTER_NO_ENTRY_POINTS="1", HF_HUB_OFFLINE="1", COLUMNS="200")
    t0 = time.perf_counter()
    r = subprocess.run([ROUTER, "retrain", "--backend", "modal", "--registry", str(reg.path)], env=env,
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "modal token new" in out and "Modal credentials not found" in out, out
    assert "Traceback" not in out
    assert elapsed < 15, elapsed  # Python + CLI start-up included; the check itself is timed above
    assert reg.path.read_bytes() == registry_bytes
    assert os.readlink(reg.router_dir) == link_before
    assert _tree_bytes(reg.router_dir.resolve()) == live_before


def test_upload_dataset_cli_needs_credentials_too(live_project, tmp_path):
    empty = tmp_path / "empty-modal.toml"
    empty.write_text("")
    r = subprocess.run([ROUTER, "upload-dataset", "--registry", str(live_project.path)], capture_output=True,
                       text=True, timeout=60, env=_env(MODAL_CONFIG_PATH=str(empty), VLROUTER_NO_ENTRY_POINTS="1"))
    assert r.returncode != 0 and "modal token new" in r.stdout + r.stderr


def test_credentials_from_env_or_the_config_profile(monkeypatch):
    import modal.config

    for k in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(BackendError, match="Modal credentials not found"):
        modal_run.check_credentials()
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-only-half")
    with pytest.raises(BackendError, match="only one of token_id/token_secret"):
        modal_run.check_credentials()
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    assert modal_run.check_credentials() == "environment"
    monkeypatch.delenv("MODAL_TOKEN_ID")
    monkeypatch.delenv("MODAL_TOKEN_SECRET")
    monkeypatch.setitem(modal.config._user_config, modal.config._profile,
                        {"token_id": "ak-file", "token_secret": "as-file"})
    assert modal_run.check_credentials().startswith(f"profile {modal.config._profile!r}")


def test_fake_credentials_without_network_say_connecting_then_fail_cleanly(live_project, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")

    def unreachable(address, timeout=None, *a, **k):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    before = _tree_bytes(live_project.root)
    prog = RecordingProgress()
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"cannot reach Modal \(api\.modal\.com:443: Network is unreachable"):
        modal_run.retrain_modal(RetrainRequest(live_project, resolve_options(live_project), progress=prog))
    assert time.perf_counter() - t0 < 5
    assert prog.messages[0] == "Connecting to Modal…"
    assert _tree_bytes(live_project.root) == before  # no dataset built, no candidate


def test_a_hanging_connection_is_bounded_by_the_connect_timeout(live_project, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-dummy")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-dummy")
    monkeypatch.setenv(modal_run.CONNECT_TIMEOUT_ENV, "0.5")

    def hang(address, timeout=None, *a, **k):
        time.sleep(30)  # a black-holed route / stuck DNS; the probe thread is a daemon
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", hang)
    prog = RecordingProgress()
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"cannot reach Modal \(no answer within 0.5 s\)"):
        modal_run.retrain_modal(RetrainRequest(live_project, resolve_options(live_project), progress=prog))
    assert time.perf_counter() - t0 < 3
    assert prog.messages == ["Connecting to Modal…"]


def test_fake_credentials_through_the_cli_print_connecting_then_one_error_line(live_project, tmp_path):
    empty = tmp_path / "empty-modal.toml"
    empty.write_text("")
    # A closed local port stands in for "no route to Modal", whatever network the test machine has.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(MODAL_CONFIG_PATH=str(empty), MODAL_TOKEN_ID="ak-dummy", MODAL_TOKEN_SECRET="as-dummy",
               MODAL_SERVER_URL=f"https://127.0.0.1:{port}", VLROUTER_MODAL_CONNECT_TIMEOUT="3",
               VLROUTER_NO_ENTRY_POINTS="1", HF_HUB_OFFLINE="1", COLUMNS="300")
    before = _tree_bytes(live_project.root)
    t0 = time.perf_counter()
    r = subprocess.run([ROUTER, "retrain", "--backend", "modal", "--registry", str(live_project.path)],
                       env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Connecting to Modal…" in out
    assert "cannot reach Modal" in out and f"127.0.0.1:{port}" in out
    assert out.index("Connecting to Modal…") < out.index("cannot reach Modal")
    assert "Traceback" not in out
    assert elapsed < 20, elapsed
    before.pop("runs/router.lock", None)
    after = _tree_bytes(live_project.root)
    after.pop("runs/router.lock", None)  # run_retrain's lock file (empty) may be left behind
    assert after == before


def test_modal_backend_is_registered_without_importing_modal():
    code = ("import sys; from vlrouter.plugins.manager import get_plugin_manager, collect_backends; "
            "b = collect_backends(get_plugin_manager(entry_points=False)); "
            "assert 'modal' in b and 'local' in b; assert 'modal' not in sys.modules, 'modal imported'; print('ok')")
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                       env=_env())
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_digest_helper_names_are_stable():
    """The volume layout names a processed sample by split and index (the seed's sample_000000)."""
    from vlrouter.backends import modal_app

    assert modal_app.preprocessed_path(Path("/p"), "train", 7) == Path("/p/train/sample_000007.safetensors")
    assert modal_app.model_slug("Qwen/Qwen3-VL-8B-Instruct") == hashlib.sha256(
        b"Qwen/Qwen3-VL-8B-Instruct@main").hexdigest()[:12]
    with pytest.raises(ValueError):
        modal_app.safe_name("../escape")
    json.dumps(modal_app.RESOURCES)  # plain data: printable, diffable


def test_retrain_gpu_flag_reaches_the_modal_settings_and_needs_modal_backend(tmp_path):
    """`router retrain --gpu A100-80GB` picks the Modal GPU; without --backend modal it is refused."""
    from typer.testing import CliRunner

    import vlrouter.cli.main  # noqa: F401  (attaches every command)
    from vlrouter.backends.modal_run import app_settings
    from vlrouter.cli.app import app
    from vlrouter.core.registry import Registry
    reg_path = tmp_path / "registry.yaml"
    reg_path.write_text("base_model: Qwen/Qwen3-VL-8B-Instruct\nadapters: []\n")
    reg = Registry.load(reg_path)
    opts = resolve_options(reg, {"gpu": "A100-80GB"})
    assert opts.gpu == "A100-80GB"
    assert "A100-80GB" in app_settings(reg, opts.gpu).values()
    before = reg_path.read_bytes()
    res = CliRunner().invoke(app, ["retrain", "--gpu", "H100", "--registry", str(reg_path)])
    assert res.exit_code != 0 and "--backend modal" in res.output
    assert reg_path.read_bytes() == before
