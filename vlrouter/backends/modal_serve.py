"""The Modal app behind ``router deploy --backend modal``: ``router serve``'s ASGI app on autoscaling GPU containers.

One class, :class:`Server`: each container loads the Engine once (``@modal.enter()``),
takes up to ``serve.concurrency`` requests at once (``@modal.concurrent``; the app's
batcher gathers them into ``act_batch`` calls) and exposes the same FastAPI app as
``router serve`` (``@modal.asgi_app()``: :func:`vlrouter.serve.create_app`). Modal starts
containers as requests arrive, between ``serve.min_containers`` and
``serve.max_containers``, and stops one idle for ``serve.scaledown_window`` seconds.

It is its own Modal app (``<modal.app_name>-serve``), so a training run (``app.run()`` of
:mod:`vlrouter.backends.modal_app`) never starts serving containers, and it reuses that
module's image and volumes: what :mod:`vlrouter.backends.modal_deploy` uploads there --

    /data/deploy/<app>/registry.yaml          the registry, pointing at the paths below
    /data/deploy/<app>/routers/<version>/     router.json + head.safetensors
    /data/models/<hash>/<name>/               a local base model (a hub id loads into /data/hf-cache)
    /checkpoints/<adapter>/                   adapter_config.json + adapter_model.safetensors

Settings come from the environment at import, like the training app's (set by
``modal_deploy.load_serve_app`` from registry.yaml's ``serve:`` section); importing needs
no network and no credentials. The class body runs in-process with
``Server().web.local()`` (tests: ``VLROUTER_SERVE_REGISTRY`` names a local registry).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import modal

from vlrouter.backends import modal_app as mapp
from vlrouter.core.engine import Engine
from vlrouter.core.registry import Registry
from vlrouter.serve import ServeSettings, create_app

log = logging.getLogger("vlrouter.serve")

ENV_SERVE_APP = "VLROUTER_MODAL_SERVE_APP"
ENV_SERVE_GPU = "VLROUTER_MODAL_SERVE_GPU"
ENV_MIN_CONTAINERS = "VLROUTER_MODAL_SERVE_MIN_CONTAINERS"
ENV_MAX_CONTAINERS = "VLROUTER_MODAL_SERVE_MAX_CONTAINERS"
ENV_SCALEDOWN = "VLROUTER_MODAL_SERVE_SCALEDOWN_WINDOW"
ENV_CONCURRENCY = "VLROUTER_MODAL_SERVE_CONCURRENCY"
ENV_TIMEOUT = "VLROUTER_MODAL_SERVE_TIMEOUT"
ENV_API_KEY = "VLROUTER_MODAL_SERVE_API_KEY"  # set only around the import by `router deploy`: becomes a Modal Secret
ENV_REGISTRY = "VLROUTER_SERVE_REGISTRY"  # the registry.yaml a container loads (default: the deployed one)
API_KEY_VAR = "VLROUTER_API_KEY"  # what the container reads its key from (the Secret sets it)
DEPLOY_DIR = "deploy"  # on the data volume

SERVE_DEFAULTS = {
    ENV_SERVE_APP: f"{mapp.APP_NAME}-serve",
    ENV_SERVE_GPU: "H100",
    ENV_MIN_CONTAINERS: "0",
    ENV_MAX_CONTAINERS: "1",
    ENV_SCALEDOWN: "300",
    ENV_CONCURRENCY: "8",
    ENV_TIMEOUT: "600",
}


def serve_settings_from_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    env = os.environ if environ is None else environ
    return {k: (env.get(k) or v) for k, v in SERVE_DEFAULTS.items()}


SERVE_SETTINGS = serve_settings_from_env()
APP_SETTINGS = dict(mapp.SETTINGS)  # the training app's settings this module was defined against (volumes)
SERVE_APP_NAME = SERVE_SETTINGS[ENV_SERVE_APP]
CONCURRENCY = int(SERVE_SETTINGS[ENV_CONCURRENCY])
DEPLOY_ROOT = f"{mapp.DATA_ROOT}/{DEPLOY_DIR}/{SERVE_APP_NAME}"  # in a container
REGISTRY_PATH = f"{DEPLOY_ROOT}/registry.yaml"

# The Server class's resources: the GPU, host CPU and memory (MiB; an 8B model is staged in host RAM), the
# autoscaling window and the per-request timeout (s), as @app.cls takes them.
SERVER_RESOURCES: dict[str, Any] = {
    "gpu": SERVE_SETTINGS[ENV_SERVE_GPU],
    "cpu": 4.0,
    "memory": 32768,
    "min_containers": int(SERVE_SETTINGS[ENV_MIN_CONTAINERS]),
    "max_containers": int(SERVE_SETTINGS[ENV_MAX_CONTAINERS]),
    "scaledown_window": int(SERVE_SETTINGS[ENV_SCALEDOWN]),
    "timeout": int(SERVE_SETTINGS[ENV_TIMEOUT]),
}
SERVER_MOUNTS = (mapp.DATA_ROOT, mapp.CHECKPOINTS_ROOT)  # deploy/, models/, hf-cache/; the adapters

serve_app = modal.App(SERVE_APP_NAME, image=mapp.image)
# `router deploy --api-key` passes the key in the environment around this import only; containers get it from
# the Secret (as VLROUTER_API_KEY), never from the app's settings.
SECRETS = [modal.Secret.from_dict({API_KEY_VAR: os.environ[ENV_API_KEY]})] if os.environ.get(ENV_API_KEY) else []
KEY_DIGEST = hashlib.sha256(os.environ.get(ENV_API_KEY, "").encode()).hexdigest()  # which key (re-import if another)


def server_options() -> dict[str, Any]:
    """The keyword arguments of ``@serve_app.cls``: SERVER_RESOURCES, the volumes, the containers' environment,
    and the API key as a Modal Secret (when ``router deploy`` was given one)."""
    opts = dict(SERVER_RESOURCES)
    opts["volumes"] = {m: mapp.VOLUMES[m] for m in SERVER_MOUNTS}
    opts["env"] = {**mapp.CONTAINER_ENV, **SERVE_SETTINGS}
    opts["secrets"] = list(SECRETS)
    return opts


def server_settings(environ: dict[str, str] | None = None) -> ServeSettings:
    """The app's limits in a container: batches of up to ``concurrency`` (at most 8), a queue for twice that,
    the request timeout; no reload polling (a new router ships with a new ``router deploy``)."""
    env = os.environ if environ is None else environ
    return ServeSettings(api_key=env.get(API_KEY_VAR) or None, max_batch_size=min(CONCURRENCY, 8),
                         max_queue=max(64, 2 * CONCURRENCY), request_timeout_s=float(SERVER_RESOURCES["timeout"]),
                         reload_interval_s=0)


@serve_app.cls(**server_options())
@modal.concurrent(max_inputs=CONCURRENCY)
class Server:
    """``router serve`` in a Modal container: the Engine loaded once per container, the FastAPI app on top."""

    @modal.enter()
    def load(self) -> None:
        path = os.environ.get(ENV_REGISTRY, REGISTRY_PATH)
        mapp._sync(mapp.DATA_ROOT, "reload")
        reg = Registry.load(path)
        self.engine = Engine.from_registry(reg)
        log.info("loaded %s: adapters %s", path, ", ".join(self.engine.adapters))
        if not modal.is_local() and not reg.base_model_is_local():  # a hub model went into the volume's HF cache:
            # keep it for the next container
            try:
                mapp._sync(mapp.DATA_ROOT, "commit")
            except Exception as e:  # another container committing at once: the next start downloads again
                log.warning("could not commit the HF cache to the data volume: %s", e)

    @modal.asgi_app()
    def web(self):
        return create_app(self.engine, server_settings())
