"""``router deploy --backend modal``: upload what the serving containers need, deploy the app, print its URL; --stop.

In order (each step before the next touches anything):

1. Credentials (no network, no torch): :func:`modal_run.check_credentials`.
2. The plan, all local: the live router must match registry.yaml (``router retrain``
   first otherwise), every adapter checkpoint is checked, ``serve:`` is validated and the
   GPU must hold the base model (:func:`modal_run.check_gpu_fits`).
3. "Connecting to Modal…" and the bounded probe (:func:`modal_run.probe_modal`).
4. Uploads to the volumes the training backend uses: a local base model once per content
   (``/data/models/…``, shared with training), the router version
   (``/data/deploy/<app>/routers/<version>/``; router.json names the base model by its
   volume path), each adapter's ``adapter_config.json`` + ``adapter_model.safetensors``
   to ``/checkpoints/<name>/`` -- only those whose content changed since the last deploy
   (a manifest of digests on the volume) -- and last the container's registry.yaml.
   Progress bars count files that reached the volume.
5. ``serve_app.deploy()`` (programmatic, no ``modal deploy``), then the endpoint URL from
   ``modal.Cls.from_name(app, "Server")().web.get_web_url()``.

:func:`stop_modal` (``--stop``): credentials, probe, ``modal.App.lookup(name).stop()``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlrouter.backends.modal_run import (
    _modal_error,
    _upload_plan,
    app_settings,
    check_credentials,
    check_gpu_fits,
    env_set,
    load_app,
    probe_modal,
    remote_base_model,
    validate_gpu,
)
from vlrouter.core.errors import BackendError, RouterError, located
from vlrouter.core.lora import WEIGHTS_FILE, AdapterSource, check_adapter_checkpoint
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.registry import Registry
from vlrouter.core.store import HEAD_FILE, META_FILE, check_router_for, read_router
from vlrouter.core.yamldoc import dump_yaml

__all__ = ["DeployPlan", "DeployResult", "check_credentials", "deploy_modal", "load_serve_app", "plan_deploy",
           "stop_modal"]

SERVE_MODULE = "vlrouter.backends.modal_serve"
CLASS_NAME = "Server"
MANIFEST = "/.vlrouter/deployed-adapters.json"  # on the checkpoints volume: adapter name -> content digest
SERVE_ENV = {  # serve: key -> the modal_serve variable it sets
    "gpu": "VLROUTER_MODAL_SERVE_GPU",
    "min_containers": "VLROUTER_MODAL_SERVE_MIN_CONTAINERS",
    "max_containers": "VLROUTER_MODAL_SERVE_MAX_CONTAINERS",
    "scaledown_window": "VLROUTER_MODAL_SERVE_SCALEDOWN_WINDOW",
    "concurrency": "VLROUTER_MODAL_SERVE_CONCURRENCY",
    "timeout": "VLROUTER_MODAL_SERVE_TIMEOUT",
}
ENV_SERVE_APP = "VLROUTER_MODAL_SERVE_APP"
ENV_API_KEY = "VLROUTER_MODAL_SERVE_API_KEY"


def serve_app_name(registry: Registry) -> str:
    return f"{registry.model.modal.app_name}-serve"


def serve_settings(registry: Registry, gpu: str | None = None) -> dict[str, str]:
    """The ``VLROUTER_MODAL_SERVE_*`` values for :mod:`modal_serve`, from registry.yaml's ``serve:`` (and --gpu)."""
    s = registry.model.serve
    chosen = validate_gpu(gpu, "--gpu") if gpu else validate_gpu(s.gpu, f"{registry.path}: serve.gpu")
    out = {ENV_SERVE_APP: serve_app_name(registry), SERVE_ENV["gpu"]: chosen}
    for key in ("min_containers", "max_containers", "scaledown_window", "concurrency", "timeout"):
        out[SERVE_ENV[key]] = str(getattr(s, key))
    return out


def load_serve_app(registry: Registry, gpu: str | None = None, api_key: str | None = None):
    """Import (or re-import) :mod:`modal_serve` defined for ``registry``: the training app's volumes (modal:),
    the serving settings (serve:) and the API key, set in the environment only around the import."""
    mapp = load_app(app_settings(registry))
    settings = {**serve_settings(registry, gpu), ENV_API_KEY: api_key or ""}
    with env_set(settings):
        mod = sys.modules.get(SERVE_MODULE)
        if mod is None:
            mod = importlib.import_module(SERVE_MODULE)
        elif (mod.APP_SETTINGS != mapp.SETTINGS or any(mod.SERVE_SETTINGS.get(k) != v for k, v in settings.items()
                                                       if k != ENV_API_KEY)
              or hashlib.sha256((api_key or "").encode()).hexdigest() != mod.KEY_DIGEST):
            mod = importlib.reload(mod)
    return mod


# ---- the plan (local, before any network) ----------------------------------------------------------

@dataclass
class DeployPlan:
    """What the containers need, checked here: the router version, the adapters, the base model."""

    registry: Registry
    router_dir: Path  # the live version folder
    version: str
    meta: Any  # RouterMeta
    adapters: list[AdapterSource]  # empty with engine.generation: vllm (the adapters live on the vLLM server)
    gpu: str
    gpu_note: str
    uploaded: dict[str, int] = field(default_factory=dict)

    @property
    def local_base_model(self) -> bool:
        return Path(self.registry.base_model).is_dir()


def plan_deploy(registry: Registry, gpu: str | None = None) -> DeployPlan:
    """Check, locally, that what would be deployed can serve: the live router matches registry.yaml, every adapter
    checkpoint is a safetensors PEFT folder made for the base model, the GPU holds the base model."""
    m = registry.model
    if not m.adapters:
        raise BackendError(located(registry.path, "adapters", "no adapters registered: nothing to serve",
                                   fix="add one with `router add-adapter NAME`"))
    registry.check_base_model()
    router = read_router(registry.router_dir)
    check_router_for(router.meta, registry)
    adapters = [AdapterSource(a.name, registry.resolve(a.checkpoint), registry.path, f"adapters[{i}].checkpoint",
                              registry.line_of(("adapters", i, "checkpoint"))) for i, a in enumerate(m.adapters)]
    if m.engine.generation == "vllm":
        adapters = []
    for src in adapters:
        check_adapter_checkpoint(src, [m.base_model, registry.base_model])
    chosen = serve_settings(registry, gpu)[SERVE_ENV["gpu"]]
    field_ = "--gpu" if gpu else "serve.gpu"
    note = check_gpu_fits(chosen, registry, field=field_, line=None if gpu else registry.line_of(("serve", "gpu")))
    return DeployPlan(registry, router.dir, router.dir.name, router.meta, adapters, chosen, note)


def container_registry(plan: DeployPlan, base_model: str, router_rel: str, checkpoints_root: str) -> str:
    """registry.yaml as the containers read it: the base model, router and adapters at their volume paths."""
    data = plan.registry.model.model_dump(mode="json", exclude_defaults=True)
    data["base_model"] = base_model
    data.setdefault("router", {})["dir"] = router_rel
    for a in data.get("adapters", []):
        a["checkpoint"] = f"{checkpoints_root}/{a['name']}"
    return f"# written by `router deploy` from {plan.registry.path}; the containers load it\n" + dump_yaml(data)


def router_files(plan: DeployPlan, base_model: str) -> list[tuple[str, bytes]]:
    """router.json (naming the base model as the containers load it) and head.safetensors of the live version."""
    meta = plan.meta.model_copy(update={"base_model": base_model} if plan.local_base_model else {})
    if plan.local_base_model:  # the weights' fingerprint holds local file times: the volume copy has others
        meta = meta.model_copy(update={"model_fingerprint": None})
    text = json.dumps(meta.model_dump(mode="json"), indent=2) + "\n"
    return [(META_FILE, text.encode()), (HEAD_FILE, (plan.router_dir / HEAD_FILE).read_bytes())]


def adapter_digest(src: AdapterSource) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", WEIGHTS_FILE):
        h.update(name.encode() + b"\0")
        with open(src.path / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def _read_manifest(volume) -> dict[str, str]:
    try:
        data = json.loads(b"".join(volume.read_file(MANIFEST)))
        return data if isinstance(data, dict) else {}
    except Exception:  # not there yet (NotFoundError), or unreadable: upload everything
        return {}


def upload_adapters(plan: DeployPlan, volume, progress: Progress | None) -> int:
    """Each adapter whose content changed since the last deploy (the manifest) -> /<name>/ on the volume."""
    if not plan.adapters:
        return 0
    manifest = _read_manifest(volume)
    digests = {src.name: adapter_digest(src) for src in plan.adapters}
    todo = [src for src in plan.adapters if manifest.get(src.name) != digests[src.name]]
    files: list[tuple[str, Path | bytes]] = [(f"{src.name}/{name}", src.path / name) for src in todo
                                             for name in ("adapter_config.json", WEIGHTS_FILE)]
    if files:
        _upload_plan(volume, "", files, progress, f"uploading {len(todo)} of {len(plan.adapters)} adapters")
    manifest.update(digests)
    _upload_plan(volume, "", [(MANIFEST.lstrip("/"), (json.dumps(manifest, indent=1) + "\n").encode())], None, "")
    return len(todo)


# ---- deploy / stop -----------------------------------------------------------------------------

@dataclass
class DeployResult:
    app: str
    url: str | None
    gpu: str
    gpu_note: str
    router: str
    adapters: int
    adapters_uploaded: int
    min_containers: int
    max_containers: int
    concurrency: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _deploy(mserve) -> None:
    """The programmatic ``modal deploy`` (a seam for tests)."""
    mserve.serve_app.deploy(name=mserve.SERVE_APP_NAME)


def _web_url(app_name: str) -> str | None:
    import modal

    return modal.Cls.from_name(app_name, CLASS_NAME)().web.get_web_url()


def deploy_modal(registry: Registry, *, api_key: str | None, gpu: str | None = None,
                 progress: Progress | None = None) -> DeployResult:
    """Upload, deploy, and return the endpoint (see the module docstring). Nothing is uploaded before every
    local check has passed and Modal has answered."""
    check_credentials()  # first: nothing imported, nothing touched
    prog = progress_or_null(progress)
    plan = plan_deploy(registry, gpu)
    prog.log("Connecting to Modal…")
    probe_modal()
    mserve = load_serve_app(registry, gpu, api_key)
    mapp = mserve.mapp

    import modal

    step = "uploading"
    try:
        with contextlib.redirect_stdout(sys.stderr), modal.enable_output():
            data = mapp.VOLUMES[mapp.DATA_ROOT]
            step = "uploading the base model"
            base = remote_base_model(mapp, registry.base_model, progress) if plan.local_base_model \
                else registry.model.base_model
            step = "uploading the router"
            router_rel = f"routers/{plan.version}"
            prefix = f"/{mserve.DEPLOY_DIR}/{mserve.SERVE_APP_NAME}"
            _upload_plan(data, f"{prefix}/{router_rel}", router_files(plan, base), progress,
                         f"uploading router {plan.version}")
            step = "uploading the adapters"
            uploaded = upload_adapters(plan, mapp.VOLUMES[mapp.CHECKPOINTS_ROOT], progress)
            step = "uploading registry.yaml"
            text = container_registry(plan, base, router_rel, mapp.CHECKPOINTS_ROOT)
            Registry.from_bytes(text.encode(), "registry.yaml")  # what the containers will read must validate
            _upload_plan(data, prefix, [("registry.yaml", text.encode())], None, "")
            step = f"deploying {mserve.SERVE_APP_NAME}"
            with prog.task(step, total=None):
                _deploy(mserve)
            step = "asking for the endpoint URL"
            url = _web_url(mserve.SERVE_APP_NAME)
    except RouterError:
        raise
    except Exception as e:
        raise _modal_error(step, e) from None
    s = registry.model.serve
    return DeployResult(app=mserve.SERVE_APP_NAME, url=url, gpu=plan.gpu, gpu_note=plan.gpu_note, router=plan.version,
                        adapters=len(registry.adapters), adapters_uploaded=uploaded, min_containers=s.min_containers,
                        max_containers=s.max_containers, concurrency=s.concurrency)


def _stop(app_name: str) -> None:
    """``modal.App.lookup(name).stop()``; a client without ``App.stop`` runs its own ``modal app stop NAME --yes``."""
    import subprocess

    import modal

    app = modal.App.lookup(app_name)  # NotFoundError when nothing of that name is deployed
    if hasattr(app, "stop"):
        app.stop()
        return
    r = subprocess.run([sys.executable, "-m", "modal", "app", "stop", app_name, "--yes"], capture_output=True,
                       text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout).strip()
                           else f"modal app stop exited {r.returncode}")


def stop_modal(registry: Registry, *, progress: Progress | None = None) -> str:
    """Stop the deployed serving app (its containers end; the volumes are kept). Returns its name."""
    check_credentials()
    name = serve_app_name(registry)
    progress_or_null(progress).log("Connecting to Modal…")
    probe_modal()
    try:
        import modal.exception as mexc

        try:
            _stop(name)
        except mexc.NotFoundError:
            raise BackendError(located(registry.path, "modal.app_name", f"no deployed Modal app named {name!r}",
                                       line=registry.line_of(("modal", "app_name")),
                                       fix="deploy it with `router deploy --backend modal`, or check modal.app_name "
                                           "and MODAL_ENVIRONMENT")) from None
    except RouterError:
        raise
    except Exception as e:
        raise _modal_error(f"stopping {name}", e) from None
    return name

