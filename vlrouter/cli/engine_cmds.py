"""Engine commands: ``route IMAGE PROMPT`` and ``act IMAGE PROMPT``.

Both load the engine from registry.yaml (base model once, every adapter, the router
head), then route -- and for ``act`` generate with the chosen adapter and parse the
action. ``--json`` prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from vlrouter.cli.app import app
from vlrouter.cli.options import DEFAULT_REGISTRY, DeviceOpt, JsonOpt, RegistryOpt
from vlrouter.cli.ui import RichProgress, console, print_json
from vlrouter.core.data import prompt_problem
from vlrouter.core.engine import Engine
from vlrouter.core.errors import InputError, located
from vlrouter.core.images import open_image

ImageArg = Annotated[str, typer.Argument(help="Screenshot to act on (PNG/JPEG path).", show_default=False)]
PromptArg = Annotated[str, typer.Argument(help="The instruction, e.g. 'Click March 29'.", show_default=False)]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Most tokens to generate.")]


def _inputs(image: str, prompt: str):
    """Open the image and check the prompt before the (slow) model load: bad input fails fast.

    The engine checks the prompt again against the tokenizer (special tokens, length)."""
    if not prompt.strip():
        raise InputError(located(None, "PROMPT", "prompt is empty",
                                 fix="pass the instruction text, e.g. 'Click March 29'"))
    problem = prompt_problem(prompt)
    if problem:
        raise InputError(located(None, "PROMPT", f"prompt {problem}", fix="remove it from the instruction"))
    return open_image(image), prompt


def _engine(registry, device):
    with RichProgress().task("loading base model, adapters and router") as t:
        engine = Engine.from_registry(registry, device=device)
        t.advance()
    return engine


def _known(known: bool, score: float | None, engine: Engine) -> str:
    if score is None:
        return "(OOD check off)"
    limit = engine.ood.threshold
    return (f"known (ood_score {score:.3g} <= {limit:.3g})" if known
            else f"[yellow]unknown[/] (ood_score {score:.3g} > {limit:.3g})")


def _probs_table(probs: dict[str, float], routed: str, acting: str | None = None) -> Table:
    """Every adapter's probability, highest first; marks the routed one and (for act) the one that acted."""
    table = Table(title="router probabilities", title_justify="left")
    table.add_column("label", justify="right")
    table.add_column("adapter")
    table.add_column("probability", justify="right")
    table.add_column("", no_wrap=True)
    labels = {name: i for i, name in enumerate(probs)}
    for name, p in sorted(probs.items(), key=lambda kv: -kv[1]):
        mark = ""
        if name == routed:
            if acting is None:
                mark = "[bold green]<- routed[/]"
            elif acting == routed:
                mark = "[bold green]<- routed, acted[/]"
            else:
                mark = "[yellow]<- routed, below router.min_confidence[/]"
        elif name == acting:
            mark = "[bold green]<- acted (fallback)[/]"
        table.add_row(str(labels[name]), escape(name), f"{p:.4f}", mark, style="bold" if mark else "")
    return table


@app.command("route")
def route_cmd(
    image: ImageArg,
    prompt: PromptArg,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Which adapter should act on IMAGE + PROMPT: the router's choice, confidence and every probability."""
    img, prompt = _inputs(image, prompt)
    engine = _engine(registry, device)
    route = engine.route(img, prompt)
    if json_out:
        print_json(route.to_dict())
        return
    console.print(f"adapter: [bold]{escape(route.adapter)}[/]  confidence: {route.confidence:.4f}  "
                  f"{_known(route.known, route.ood_score, engine)}")
    console.print(_probs_table(route.probs, route.adapter))


@app.command("act")
def act_cmd(
    image: ImageArg,
    prompt: PromptArg,
    registry: RegistryOpt = DEFAULT_REGISTRY,
    device: DeviceOpt = None,
    max_new_tokens: MaxNewTokensOpt = 64,
    json_out: JsonOpt = False,
) -> None:
    """Route IMAGE + PROMPT, generate with the chosen adapter, parse the action."""
    img, prompt = _inputs(image, prompt)
    engine = _engine(registry, device)
    action = engine.act(img, prompt, max_new_tokens=max_new_tokens)
    if json_out:
        print_json(action.to_dict())
        return
    head = (f"adapter: [bold]{escape(action.adapter)}[/]  confidence: {action.confidence:.4f}  "
            f"{_known(action.known, action.ood_score, engine)}")
    if action.fallback:
        why = "the input is unlike the training data" if not action.known else \
            f"below router.min_confidence={engine.min_confidence}"
        head += f"  [yellow](router chose {escape(action.routed)}, {why}; fallback: {escape(engine.fallback)})[/]"
    console.print(head)
    console.print(_probs_table(action.probs, action.routed, action.adapter))
    console.print(f"text:   {escape(repr(action.text))}")
    parsed = str(action.action) if action.action is not None else "[yellow](none: the text did not parse)[/]"
    console.print(f"action: {escape(parsed) if action.action is not None else parsed}")
    t = action.timings
    console.print(f"timings: route {t['route_ms']:.1f} ms, generate {t['generate_ms']:.1f} ms, "
                  f"total {t['total_ms']:.1f} ms")
