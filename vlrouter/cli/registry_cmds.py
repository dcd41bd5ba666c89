"""Registry and plugin commands: ``plugins``, ``status``, ``add-adapter``, ``remove-adapter``, ``tiny-model``.

Edits to registry.yaml are validated in memory first (:meth:`Registry.add_adapter`,
:meth:`Registry.remove_adapter`), the router is retrained for the new label set unless
``--no-retrain``, and only then is the file written (atomically, comments kept). Any
error on the way leaves registry.yaml byte-identical.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Optional

import enum

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
)
from vlrouter.cli.ui import RichProgress, console, err_console, handle_errors, print_json
from vlrouter.core.errors import CheckpointError, RegistryError, StaleRouterError, TrainingError, located
from vlrouter.core.registry import NAME_RE, AdapterEntry, Registry, suggest
from vlrouter.core.tiny import PRESETS

# ---- shared helpers ------------------------------------------------------------------------


def _load(registry: Path) -> tuple[Registry, bytes]:
    """The registry and the exact bytes it was parsed from (to refuse overwriting a concurrent edit)."""
    reg = Registry.load(registry)
    return reg, reg.path.read_bytes()


def _save(new: Registry, before: bytes, *, retrained: bool = False) -> None:
    """Atomic save, refused when someone else changed the file since we read it."""
    try:
        now = new.path.read_bytes()
    except OSError:
        now = None
    if now != before:
        after = (f"; the router retrained for {', '.join(new.adapter_names)} is already live, so it is stale "
                 "against the file until you run the command again") if retrained else ""
        raise RegistryError(located(new.path, None, f"the file changed on disk while this command ran; not "
                                    f"overwriting it{after}", fix="run the command again"))
    new.save()


def _count_lines(path: Path) -> int:
    n = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return n


def _is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _as_registry_path(reg: Registry, value: str) -> str:
    """A path typed on the command line (relative to the cwd) as registry.yaml stores it.

    registry.yaml's relative paths resolve against the registry's folder, so a relative
    path given here is rewritten relative to that folder (unchanged when the registry sits
    in the current directory). Absolute paths stay absolute.
    """
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    absolute = Path(os.path.abspath(p))
    root = Path(os.path.abspath(reg.root))
    try:
        return absolute.relative_to(root).as_posix()
    except ValueError:
        return os.path.relpath(absolute, root)


def _plugin_module_name(pm, plugin_label: str) -> str | None:
    """The importable module behind a registered plugin (what ``plugin:`` in registry.yaml needs).

    Built-ins are registered under their module name, entry-point plugins under the entry
    point's name: in both cases the module's ``__name__`` is written, so registry.yaml works
    with entry-point loading switched off too. Non-module plugins (objects) get no ``plugin:``.
    """
    obj = pm.get_plugin(plugin_label)
    if isinstance(obj, ModuleType):
        return obj.__name__
    return None


def _overrides(**flags: Any) -> dict[str, Any]:
    return {k: v for k, v in flags.items() if v is not None}


def _retrain(new: Registry, *, overrides: dict[str, Any], force: bool, backend: str | None):
    """Train and promote a router for the in-memory registry ``new``. Does not write registry.yaml."""
    try:
        from vlrouter.core.train import run_retrain
    except ImportError as e:
        raise TrainingError(f"retraining is not available in this install ({e}) "
                            "(fix: pass --no-retrain, then `router retrain` once training is installed)") from None
    kwargs: dict[str, Any] = {"backend": backend} if backend is not None else {}
    result = run_retrain(new, overrides=overrides, force=force, progress=RichProgress(), **kwargs)
    if not getattr(result, "promoted", True):
        msg = getattr(result, "message", "") or "the eval gate kept the live router"
        raise TrainingError(located(new.router_dir, None, f"the new router was not promoted: {msg}; "
                                    f"{new.path.name} was left unchanged",
                                    fix="pass --force to promote it anyway, or --no-retrain"))
    return result


def _report_retrain(result) -> None:
    acc = getattr(result, "val_acc", None)
    bits = []
    if acc is not None:
        bits.append(f"val acc {acc:.3f}")
    live = getattr(result, "live_val_acc", None)
    if live is not None:
        bits.append(f"previous {live:.3f}")
    new_emb, reused = getattr(result, "embedded_new", None), getattr(result, "reused_cached", None)
    if new_emb is not None and reused is not None:
        bits.append(f"embedded {new_emb} new, reused {reused} cached")
    console.print(f"router retrained and promoted: {escape(str(getattr(result, 'router_dir', '')))}"
                  + (f" ({', '.join(bits)})" if bits else ""), highlight=False, soft_wrap=True)


def _stale_hint(reg: Registry) -> None:
    if (reg.router_dir / "router.json").is_file():
        console.print("the router is now stale (trained for another label set): run `router retrain`",
                      highlight=False, soft_wrap=True)
    else:
        console.print("no router trained yet: run `router retrain`", highlight=False, soft_wrap=True)


def _router_state(reg: Registry) -> dict[str, Any]:
    """The live router folder as `status` reports it: missing / ok / stale / unreadable."""
    from vlrouter.core.head import check_compatible, read_meta

    d = reg.router_dir
    out: dict[str, Any] = {"dir": str(d)}
    if not (d / "router.json").is_file():
        out["state"] = "missing"
        return out
    try:
        meta = read_meta(d)
    except CheckpointError as e:
        out.update(state="unreadable", reason=str(e))
        return out
    out.update(adapters=list(meta.adapters), created_at=meta.created_at, val_acc=meta.best_acc,
               base_model=meta.base_model, pooling=meta.pooling, layer=meta.layer)
    # A router may record the registry's base_model as written, or resolved to a local folder
    # (relative to the cwd of the run that trained it, or absolute): all name the same model.
    raw = reg.model.base_model
    same = meta.base_model in (raw, reg.base_model) or (
        reg.resolve(raw).exists() and Path(meta.base_model).is_absolute()
        and os.path.realpath(meta.base_model) == os.path.realpath(reg.resolve(raw)))
    base = meta.base_model if same else raw
    try:
        check_compatible(meta, adapters=reg.adapter_names, base_model=base, pooling=reg.model.router.pooling,
                         layer=reg.model.router.layer, where=d / "router.json")
        out["state"] = "ok"
    except StaleRouterError as e:
        out.update(state="stale", reason=str(e))
    return out


# ---- router plugins ------------------------------------------------------------------------


@app.command("plugins")
@handle_errors
def plugins_cmd(
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """List plugins: built-ins, installed packages (entry-point group `vlrouter`) and modules named by
    `plugin:` in registry.yaml; with the hooks each implements and the adapters each declares."""
    from vlrouter.plugins.manager import BUILTIN_PLUGINS, collect_adapters, get_plugin_manager, plugin_table

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
@handle_errors
def status_cmd(
    registry: RegistryOpt = DEFAULT_REGISTRY,
    as_json: JsonOpt = False,
) -> None:
    """Show the registry's adapters (label, plugin, dataset and checkpoint present or missing) and the
    router: missing, or its adapters, creation time, validation accuracy and whether it is stale."""
    reg = Registry.load(registry)
    adapters = []
    for i, a in enumerate(reg.adapters):
        ds, ck = reg.resolve(a.dataset), reg.resolve(a.checkpoint)
        ds_ok = ds.is_file()
        adapters.append({
            "label": i,
            "name": a.name,
            "plugin": a.plugin or "generic",
            "dataset": str(ds),
            "dataset_present": ds_ok,
            "dataset_lines": _count_lines(ds) if ds_ok else None,
            "checkpoint": str(ck),
            "checkpoint_present": _is_peft_dir(ck),
        })
    router = _router_state(reg)
    if as_json:
        print_json({"registry": str(reg.path), "base_model": reg.model.base_model,
                    "label_fingerprint": reg.label_fingerprint(), "adapters": adapters, "router": router})
        return

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
    console.print(head + line, highlight=False, soft_wrap=True)
    if state == "stale":
        console.print(f"[bold yellow]STALE[/]: {escape(router['reason'])}", highlight=False, soft_wrap=True)
    else:
        console.print("[green]up to date[/] with the registry's adapters", highlight=False, soft_wrap=True)


# ---- router add-adapter / remove-adapter -----------------------------------------------------


@app.command("add-adapter")
@handle_errors
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
    from vlrouter.plugins.manager import collect_adapters, get_plugin_manager, load_module_plugin

    reg, before = _load(registry)
    label = len(reg.adapter_names)
    where = f"adapters[{label}].name"
    if not NAME_RE.match(name):
        raise RegistryError(located(reg.path, where, f"adapter name {name!r} must match [a-z0-9][a-z0-9-]* "
                                    "(lowercase letters, digits, dashes)", fix="e.g. 'provider-select'"))
    if name in reg.adapter_names:
        # Let the registry word it (with the line of the existing entry).
        reg.add_adapter(AdapterEntry(name=name, dataset="-", checkpoint="-"))
    pm = get_plugin_manager(reg)
    if plugin:
        load_module_plugin(pm, plugin, where=(None, "--plugin"))
    specs = collect_adapters(pm)
    spec = specs.get(name)
    plugin_value: str | None = None
    if spec is not None:
        plugin_value = _plugin_module_name(pm, spec.plugin)
        if plugin and plugin_value and plugin != plugin_value:
            raise RegistryError(located(None, "--plugin", f"adapter {name!r} is declared by plugin "
                                        f"{spec.plugin!r}, not {plugin!r}", fix="drop --plugin"))
        if dataset is None and spec.dataset is None:
            raise RegistryError(located(reg.path, f"adapters[{label}].dataset", f"plugin {spec.plugin!r} gives no "
                                        f"default dataset for {name!r}", fix="pass --dataset PATH"))
        if checkpoint is None and spec.checkpoint is None:
            raise RegistryError(located(reg.path, f"adapters[{label}].checkpoint", f"plugin {spec.plugin!r} gives "
                                        f"no default checkpoint for {name!r}", fix="pass --checkpoint PATH"))
        ds_value = _as_registry_path(reg, dataset) if dataset is not None else spec.dataset
        ck_value = _as_registry_path(reg, checkpoint) if checkpoint is not None else spec.checkpoint
    else:
        if dataset is None and checkpoint is None:
            raise RegistryError(located(reg.path, where, f"unknown adapter {name!r}"
                                        + suggest(name, sorted(set(specs) | set(reg.adapter_names))),
                                        fix="install its plugin, or pass --dataset and --checkpoint for the "
                                            "generic adapter"))
        if dataset is None or checkpoint is None:
            missing = "--dataset" if dataset is None else "--checkpoint"
            raise RegistryError(located(reg.path, where, f"no plugin declares {name!r}, so the generic adapter "
                                        f"needs both --dataset and --checkpoint", fix=f"add {missing} PATH"))
        plugin_value = plugin
        ds_value, ck_value = _as_registry_path(reg, dataset), _as_registry_path(reg, checkpoint)

    new = reg.add_adapter(AdapterEntry(name=name, plugin=plugin_value, dataset=ds_value, checkpoint=ck_value))
    new.check_paths([name])
    source = f"plugin {plugin_value}" if plugin_value else "generic JSONL adapter"
    if no_retrain:
        _save(new, before)
        console.print(f"added {name!r} as label {label} ({source}) to {escape(str(new.path))}", highlight=False, soft_wrap=True)
        _stale_hint(new)
    else:
        result = _retrain(new, overrides=_overrides(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience),
                          force=force, backend=backend)
        _save(new, before, retrained=True)
        console.print(f"added {name!r} as label {label} ({source}) to {escape(str(new.path))}", highlight=False, soft_wrap=True)
        _report_retrain(result)
    if not _is_peft_dir(new.resolve(ck_value)):
        err_console.print(f"[yellow]note:[/] checkpoint {escape(str(new.resolve(ck_value)))} has no "
                          "adapter_config.json yet; routing works, but `router act` needs it", highlight=False,
                          soft_wrap=True)


@app.command("remove-adapter")
@handle_errors
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
    reg, before = _load(registry)
    label = reg.index_of(name)
    new = reg.remove_adapter(name)
    remaining = new.adapter_names
    if no_retrain or len(remaining) < 2:
        _save(new, before)
        console.print(f"removed {name!r} (was label {label}); {len(remaining)} adapters left: "
                      f"{', '.join(remaining) or 'none'}", highlight=False, soft_wrap=True)
        if len(remaining) < 2 and not no_retrain:
            console.print("fewer than two adapters left: nothing to route between, so no retrain", highlight=False, soft_wrap=True)
        _stale_hint(new)
        return
    result = _retrain(new, overrides=_overrides(epochs=epochs, batch_size=batch_size, lr=lr, patience=patience),
                      force=force, backend=backend)
    _save(new, before, retrained=True)
    console.print(f"removed {name!r} (was label {label}); {len(remaining)} adapters left: {', '.join(remaining)}",
                  highlight=False, soft_wrap=True)
    _report_retrain(result)


# ---- router tiny-model -----------------------------------------------------------------------


def _safetensors_parameters(folder: Path) -> int:
    """Sum of tensor sizes from the safetensors headers (no torch import, no weights read)."""
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in info["shape"]:
                count *= dim
            total += count
    return total


Preset = enum.Enum("Preset", {name: name for name in PRESETS}, type=str)


@app.command("tiny-model")
@handle_errors
def tiny_model_cmd(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the model, tokenizer and processor into.")],
    preset: Annotated[Preset, typer.Option(
        "--preset", help="tiny: ~0.2M parameters for tests; demo: ~2M for the demo; 100m: ~100M parameters for "
                         "benchmarks.")] = Preset("tiny"),
) -> None:
    """Build a random Qwen3-VL (model + tokenizer + image processor + chat template) offline.

    The folder loads with from_pretrained like a hub checkpoint: use it as `base_model:`."""
    from vlrouter.cli.ui import quiet_libraries
    from vlrouter.core.tiny import build_tiny_model

    quiet_libraries()
    preset = preset.value
    with RichProgress().task(f"building {preset} Qwen3-VL"):
        out = build_tiny_model(out_dir, preset)
    n = _safetensors_parameters(Path(out))
    console.print(f"wrote a random Qwen3-VL (preset {preset}, {n:,} parameters) to {escape(str(out))}",
                  highlight=False, soft_wrap=True)
