"""``router deploy``: serve the router on Modal GPU containers (``router serve``'s app), or ``--stop`` it."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape

from vlrouter.backends.modal_deploy import check_credentials, deploy_modal, stop_modal
from vlrouter.cli.app import app
from vlrouter.cli.options import DEFAULT_REGISTRY, JsonOpt, RegistryOpt
from vlrouter.cli.ui import RichProgress, console, print_json
from vlrouter.core.errors import InputError, located
from vlrouter.core.registry import Registry

DeployBackendOpt = Annotated[str, typer.Option("--backend", help="Where to serve: modal (the only one so far).")]
StopOpt = Annotated[bool, typer.Option("--stop", help="Stop the deployed app instead (its containers end; the "
                                                      "volumes and what was uploaded stay).")]
DeployKeyOpt = Annotated[Optional[str], typer.Option(
    "--api-key", envvar="VLROUTER_API_KEY", show_envvar=True,
    help="Clients must send Authorization: Bearer KEY (stored as a Modal Secret).")]
PublicOpt = Annotated[bool, typer.Option("--public", help="Deploy without an API key: anyone with the URL can use "
                                                          "the model (and your GPU hours).")]
ServeGpuOpt = Annotated[Optional[str], typer.Option("--gpu", help="GPU of the serving containers, e.g. L4, H100 "
                                                                  "(default: serve.gpu in registry.yaml).")]


@app.command("deploy")
def deploy_cmd(
    backend: DeployBackendOpt = "modal",
    stop: StopOpt = False,
    api_key: DeployKeyOpt = None,
    public: PublicOpt = False,
    gpu: ServeGpuOpt = None,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Serve the router on Modal GPU containers (the `router serve` app, autoscaled), or --stop it."""
    if backend != "modal":
        raise InputError(located(None, "--backend", f"cannot deploy to {backend!r}", fix="use --backend modal"))
    check_credentials()  # before anything else: no token, no work, in well under a second
    reg = Registry.load(registry)
    if stop:
        name = stop_modal(reg, progress=RichProgress())
        if as_json:
            print_json({"stopped": name})
        else:
            console.print(f"stopped Modal app {escape(name)} (uploads stay on the volumes; `router deploy` starts it "
                          "again)", highlight=False, soft_wrap=True)
        return
    if not api_key and not public:
        raise InputError(located(None, "--api-key", "the endpoint would be public: anyone with its URL could use "
                                 "the model on your GPUs", fix="pass --api-key KEY (or set VLROUTER_API_KEY), or "
                                 "--public to deploy without one"))
    result = deploy_modal(reg, api_key=None if public else api_key, gpu=gpu, progress=RichProgress())
    if as_json:
        print_json(result.to_dict())
        return
    console.print(f"deployed {escape(result.app)}: router {escape(result.router)}, {result.adapters} adapters "
                  f"({result.adapters_uploaded} uploaded), {escape(result.gpu)}, {result.min_containers}-"
                  f"{result.max_containers} containers x {result.concurrency} concurrent requests",
                  highlight=False, soft_wrap=True)
    console.print(f"endpoint: {escape(str(result.url))}  (OpenAI base_url: {escape(str(result.url))}/v1"
                  f"{', API key required' if not public else ', no API key'})", highlight=False, soft_wrap=True)
