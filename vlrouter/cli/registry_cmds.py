"""Registry and plugin commands: ``plugins``, ``status``, ``add-adapter``, ``remove-adapter``.

Parse, call, print: the entry an adapter gets comes from
:func:`vlrouter.plugins.manager.new_adapter_entry`, the edit from
:meth:`Registry.add_adapter` / :meth:`Registry.remove_adapter`, the retrain-then-save from
:func:`vlrouter.core.recipe.edit_adapters` (registry.yaml is written only after the retrain
succeeds, and never over a concurrent edit). Any error leaves registry.yaml byte-identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from vlrouter.cli.app import app
from vlrouter.cli.options import (
    DEFAULT_REGISTRY,
    BackendOpt,
    BatchSizeOpt,
    EpochsOpt,
    ForceOpt,
    JsonOpt,
    LrOpt,
    NoRetrainOpt,
    PatienceOpt,
    RegistryOpt,
    overrides,
)
from vlrouter.cli.ui import RichProgress, console, err_console, print_json
from vlrouter.core.errors import GenerationServerError
from vlrouter.core.options import resolve_options
from vlrouter.core.recipe import RetrainResult, edit_adapters
from vlrouter.core.registry import Registry
from vlrouter.core.status import is_peft_dir, registry_status
from vlrouter.core.vllm import sync_adapter
from vlrouter.plugins.manager import (
    BUILTIN_PLUGINS,
    collect_adapters,
    get_backend,
    get_plugin_manager,
    new_adapter_entry,
    plugin_table,
)


def _report_retrain(result: RetrainResult) -> None:
    bits = [f"val acc {result.val_acc:.3f}"]
    if result.live_val_acc is not None:
        bits.append(f"previous {result.live_val_acc:.3f}")
    bits.append(f"embedded {result.embedded_new} new, reused {result.reused_cached} cached")
    console.print(f"router retrained and promoted: {escape(result.router_dir)} ({', '.join(bits)})",
                  highlight=False, soft_wrap=True)


def _stale_hint(reg: Registry) -> None:
    if (reg.router_dir / "router.json").is_file():
        console.print("the router is now stale (trained for another label set): run `router retrain`",
                      highlight=False, soft_wrap=True)
    else:
        console.print("no router trained yet: run `router retrain`", highlight=False, soft_wrap=True)


def _sync_vllm(reg: Registry, name: str, *, added: bool) -> None:
    """With engine.generation: vllm, load (unload) the adapter on the vLLM server too; a failure is a warning
    (the registry and the router are already updated)."""
    try:
        message = sync_adapter(reg, name, added=added)
    except GenerationServerError as e:
        err_console.print(f"[yellow]warning:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return
    if message:
        console.print(message, highlight=False, soft_wrap=True)


def _edit(new: Registry, *, retrain: bool, flags: dict[str, Any], force: bool) -> RetrainResult | None:
    """Retrain for the edited registry ``new`` (unless not ``retrain``), then save it."""
    if not retrain:
        return edit_adapters(new, backend=None)
    options = resolve_options(new, flags)
    backend = get_backend(get_plugin_manager(new), options.backend)
    return edit_adapters(new, backend=backend, options=options, force=force, progress=RichProgress())


# ---- router plugins ------------------------------------------------------------------------


@app.command("plugins")
def plugins_cmd(
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """List plugins: built-ins, installed packages (entry-point group `vlrouter`) and modules named by
    `plugin:` in registry.yaml; with the hooks each implements and the adapters each declares."""
    reg = Registry.load(registry) if Path(registry).exists() else None
    pm = get_plugin_manager(reg)
    order = {name: i for i, name in enumerate(BUILTIN_PLUGINS)}
    rows = sorted(plugin_table(pm), key=lambda r: (order.get(r["name"], len(order)), r["name"]))
    specs = collect_adapters(pm)
    if as_json:
        print_json({
            "registry": str(reg.path) if reg else None,
            "plugins": rows,
            "adapters": {n: {"plugin": s.plugin, "description": s.description, "dataset": s.dataset,
                             "checkpoint": s.checkpoint} for n, s in specs.items()},
        })
        return
    table = Table(title="vlrouter plugins", title_justify="left")
    table.add_column("plugin", overflow="fold")
    table.add_column("from", overflow="fold")
    table.add_column("hooks", overflow="fold")
    table.add_column("adapters", overflow="fold")
    for row in rows:
        table.add_row(escape(row["name"]), escape(row["distribution"]), "\n".join(row["hooks"]) or "-",
                      "\n".join(row["adapters"]) or "-")
    console.print(table)
    registered = set(reg.adapter_names) if reg else set()
    available = [n for n in specs if n not in registered]
    if available:
        console.print("available to add: " + ", ".join(available) + "  (`router add-adapter NAME`)",
                      highlight=False, soft_wrap=True)


# ---- router status -------------------------------------------------------------------------


@app.command("status")
def status_cmd(
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Show the registry's adapters (label, plugin, dataset and checkpoint present or missing) and the
    router: missing, or its adapters, creation time, validation accuracy and whether it is stale."""
    reg = Registry.load(registry)
    report = registry_status(reg)
    if as_json:
        print_json(report)
        return
    adapters, router = report["adapters"], report["router"]

    console.print(f"registry: {escape(str(reg.path))}   base model: {escape(reg.model.base_model)}",
                  highlight=False, soft_wrap=True)
    table = Table(title=f"adapters ({len(adapters)})", title_justify="left")
    table.add_column("label", justify="right")
    table.add_column("name")
    table.add_column("plugin", overflow="fold")
    table.add_column("dataset", overflow="fold")
    table.add_column("checkpoint", overflow="fold")
    for a in adapters:
        ds = (f"[green]present[/] ({a['dataset_lines']} lines)" if a["dataset_present"] else "[red]missing[/]")
        ck = "[green]present[/]" if a["checkpoint_present"] else "[red]missing[/]"
        table.add_row(str(a["label"]), a["name"], escape(a["plugin"]),
                      f"{escape(a['dataset'])}\n{ds}", f"{escape(a['checkpoint'])}\n{ck}")
    if not adapters:
        table.add_row("-", "(none)", "", "", "")
    console.print(table)

    state = router["state"]
    head = f"router: {escape(router['dir'])}: "
    if state == "missing":
        console.print(head + "[yellow]missing[/] (train one with `router retrain`)", highlight=False, soft_wrap=True)
        return
    if state == "unreadable":
        console.print(head + f"[red]unreadable[/]: {escape(router['reason'])}", highlight=False, soft_wrap=True)
        return
    acc = router.get("val_acc")
    line = f"{len(router['adapters'])} adapters ({', '.join(router['adapters'])}), created {router.get('created_at')}"
    if acc is not None:
        line += f", val acc {acc:.3f}"
    line += f"; reads {router['representation']}"
    if router.get("cv_acc") is not None:
        line += f" (chosen by CV, {router['cv_acc']:.3f})"
    console.print(head + line, highlight=False, soft_wrap=True)
    if state == "stale":
        console.print(f"[bold yellow]STALE[/]: {escape(router['reason'])}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]up to date[/] with the registry's adapters", highlight=False, soft_wrap=True)


# ---- router add-adapter / remove-adapter -----------------------------------------------------


@app.command("add-adapter")
def add_adapter_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name (the router label), e.g. provider-select.")],
    dataset: Annotated[Optional[str], typer.Option(
        "--dataset", help="Training JSONL (LLaVA-style). Default: the declaring plugin's. Relative to the "
                          "current directory; stored relative to the registry's folder.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        "--checkpoint", help="PEFT LoRA folder (adapter_config.json + weights). Default: the plugin's.")] = None,
    plugin: Annotated[Optional[str], typer.Option(
        "--plugin", help="Python module providing the adapter's hooks (written as `plugin:`; it is imported, "
                         "so only name code you trust).")] = None,
    no_retrain: NoRetrainOpt = False,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    patience: PatienceOpt = None,
    backend: BackendOpt = None,
    force: ForceOpt = False,
    registry: RegistryOpt = DEFAULT_REGISTRY,
) -> None:
    """Add adapter NAME as the next label, retrain the router over the new label set, then save registry.yaml.

    NAME declared by a plugin (built-in or installed) takes its dataset/checkpoint defaults from it;
    any other NAME uses the generic JSONL adapter and needs --dataset and --checkpoint.
    registry.yaml is written only after the retrain succeeds (or at once with --no-retrain)."""
    reg = Registry.load(registry)
    entry, source = new_adapter_entry(reg, name, dataset=dataset, checkpoint=checkpoint, plugin=plugin)
    label = len(reg.adapter_names)
    new = reg.add_adapter(entry)
    new.check_paths([name])
    result = _edit(new, retrain=not no_retrain, force=force,
                   flags=overrides(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, backend=backend))
    console.print(f"added {name!r} as label {label} ({source}) to {escape(str(new.path))}", highlight=False,
                  soft_wrap=True)
    if result is None:
        _stale_hint(new)
    else:
        _report_retrain(result)
    _sync_vllm(new, name, added=True)
    if not is_peft_dir(new.resolve(entry.checkpoint)):
        err_console.print(f"[yellow]note:[/] checkpoint {escape(str(new.resolve(entry.checkpoint)))} has no "
                          "adapter_config.json yet; routing works, but `router act` needs it", highlight=False,
                          soft_wrap=True)


@app.command("remove-adapter")
def remove_adapter_cmd(
    name: Annotated[str, typer.Argument(help="Adapter name to remove; later labels move up by one.")],
    no_retrain: NoRetrainOpt = False,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    patience: PatienceOpt = None,
    backend: BackendOpt = None,
    force: ForceOpt = False,
    registry: RegistryOpt = DEFAULT_REGISTRY,
) -> None:
    """Remove adapter NAME, retrain the router over the remaining labels, then save registry.yaml.

    Its dataset and checkpoint files are left on disk. registry.yaml is written only after the
    retrain succeeds (or at once with --no-retrain)."""
    reg = Registry.load(registry)
    label = reg.index_of(name)
    new = reg.remove_adapter(name)
    remaining = new.adapter_names
    retrain = not no_retrain and len(remaining) >= 2
    result = _edit(new, retrain=retrain, force=force,
                   flags=overrides(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, backend=backend))
    console.print(f"removed {name!r} (was label {label}); {len(remaining)} adapters left: "
                  f"{', '.join(remaining) or 'none'}", highlight=False, soft_wrap=True)
    _sync_vllm(new, name, added=False)
    if result is not None:
        _report_retrain(result)
        return
    if len(remaining) < 2 and not no_retrain:
        console.print("fewer than two adapters left: nothing to route between, so no retrain", highlight=False,
                      soft_wrap=True)
    _stale_hint(new)
