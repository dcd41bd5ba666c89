#!/usr/bin/env python
"""Real-size GPU benchmark: the Qwen3-VL-2B and -8B architectures with random bf16 weights, vlrouter's Engine.

    bash bench/gpu/run                          # a CUDA machine: 2B, then 8B; bench/results/gpu-{2b,8b}.json + README
    bash bench/gpu/run --sizes 8b --out DIR     # one size, results elsewhere (the README is left alone)
    bash bench/gpu/run --dry-run [--out DIR]    # CPU, fp32, the ~100M `100m` preset, fewer repetitions (a test runs it)

Nothing is downloaded. The model is built from the published ``config.json`` of
``Qwen/Qwen3-VL-2B-Instruct`` / ``-8B-Instruct`` (embedded below) with random weights,
directly on the device (``_from_config`` under ``torch.device``), with the tokenizer and
chat template of :mod:`vlrouter.core.tiny` (byte-level, Qwen's special tokens; their ids
are written into the config, the vocabulary keeps its published size) and the published
image-processor settings. Random weights cost the same FLOPs and bytes as trained ones;
``min_new_tokens`` makes every generation produce exactly ``max_new_tokens`` tokens.

Each size runs in a fresh process and writes ``gpu-<size>.json`` as soon as it is done
(so a timeout still leaves the sizes before it). One process measures, in this order:

1. **base alone**: build the model; peak memory of one greedy generate (32 new tokens) on a
   1280x720 screenshot.
2. **embedding throughput as ``router embed`` runs it**: :func:`vlrouter.core.features.embed_dataset`
   with an :class:`~vlrouter.core.encoder.Encoder` over synthetic screenshots
   (:mod:`vlrouter.demo.screens`, resized to 1280x720, written as PNG), ``train.workers``
   and ``train.embed_batch_size`` at their defaults, an empty feature cache; and the
   forward alone on already-processed batches (what the GPU could take).
3. a linear router head on those features (nearest task centroid: the screenshots' task is
   the label), so the batches below route to a mix of adapters as a trained router would.
4. **Engine, 4 adapters**: four LoRAs made in memory with peft (rank 8 on every language-model
   projection, non-zero B, like ``bench/bench_engine.py``) in ONE PeftModel over the same base;
   peak memory of one ``act``; act latency (route / generate / total, vision-tower forwards
   per act; median); route latency with the router at the last layer vs the middle layer
   (whatever the engine does: this shows early exit once the engine stops the routing pass
   at the router's layer); ``act_batch`` throughput and peak memory at each batch size.
5. **the seed's two-copy design**: a second base model for routing next to the PeftModel;
   peak memory of one route + one generate.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``
(tensors only: no CUDA context, no allocator cache), with what is resident at the start
of each phase reported beside it; on CPU, peak RSS since the phase started (VmHWM after
``/proc/self/clear_refs``), or n/a. Timings synchronise the device around every call and
take medians after warm-up calls.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1]
ROOT = BENCH.parent
RESULTS = BENCH / "results"
for _p in (str(ROOT), str(BENCH)):  # vlrouter without an install; bench_engine's helpers
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_engine  # noqa: E402  (sets the offline environment; its LoRA targets, VmHWM reader, quieting)

os.environ.setdefault("PYTHONUNBUFFERED", "1")

SCREEN = (1280, 720)
ADAPTERS = ["calendar", "claim-window", "provider-select", "settings-toggle"]  # vlrouter.demo.screens.TASKS
LORA_RANK = 8
LORA_TARGETS = bench_engine.LORA_TARGETS  # every language-model projection; the vision tower stays the base's
SIZE_ORDER = ["tiny", "demo", "100m", "2b", "8b"]
MIB = 1024 * 1024
COMMAND_ENV = "VLROUTER_GPU_BENCH_COMMAND"  # the command line, handed from the driver to each size's process

# ---- the published configurations -----------------------------------------------------------
# config.json of https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct and
# https://huggingface.co/Qwen/Qwen3-VL-8B-Instruct (blob/main/config.json), transcribed from copies
# of those files in public repositories (the Hub is unreachable where this was written) and checked
# against the transformers 5 Qwen3VLConfig defaults (the 8B vision tower is the default one). Check:
# the 8B dict builds 8,767,123,696 parameters = 17,534,247,392 bf16 bytes, the `total_size` in the
# published model.safetensors.index.json. Token ids and `vocab_size` are the published ones here;
# build_config() writes the vlrouter test tokenizer's ids over the token ids (its 270 ids fit the
# published vocabulary, which keeps its size: embedding and LM head are full size).
_TEXT_COMMON = {
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "initializer_range": 0.02,
    "max_position_embeddings": 262144, "model_type": "qwen3_vl_text", "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936,
}
_VISION_COMMON = {
    "hidden_act": "gelu_pytorch_tanh", "in_channels": 3, "initializer_range": 0.02, "model_type": "qwen3_vl",
    "num_heads": 16, "num_position_embeddings": 2304, "patch_size": 16, "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}
_TOP_COMMON = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "transformers_version": "4.57.0.dev0", "video_token_id": 151656, "vision_end_token_id": 151653,
    "vision_start_token_id": 151652,
}
PUBLISHED: dict[str, dict] = {
    "2b": {
        **_TOP_COMMON,
        "text_config": {**_TEXT_COMMON, "hidden_size": 2048, "intermediate_size": 6144, "num_attention_heads": 16,
                        "num_hidden_layers": 28, "tie_word_embeddings": True},
        "tie_word_embeddings": True,
        "vision_config": {**_VISION_COMMON, "deepstack_visual_indexes": [5, 11, 17], "depth": 24,
                          "hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048},
    },
    "8b": {
        **_TOP_COMMON,
        "text_config": {**_TEXT_COMMON, "hidden_size": 4096, "intermediate_size": 12288, "num_attention_heads": 32,
                        "num_hidden_layers": 36, "tie_word_embeddings": False},
        "tie_word_embeddings": False,
        "vision_config": {**_VISION_COMMON, "deepstack_visual_indexes": [8, 16, 24], "depth": 27,
                          "hidden_size": 1152, "intermediate_size": 4304, "out_hidden_size": 4096},
    },
}
# preprocessor_config.json of both checkpoints (same file): 65,536 to 16,777,216 pixels, so a
# 1280x720 screenshot is kept at full size (resized to 1280x704: 3,520 patches, 880 image tokens).
PUBLISHED_IMAGE_PROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}
CONFIG_SOURCE = {s: f"https://huggingface.co/Qwen/Qwen3-VL-{s.upper()}-Instruct/blob/main/config.json"
                 for s in PUBLISHED}


@dataclass(frozen=True)
class Plan:
    """How much to measure. ``FULL`` is sized for 2B + 8B within 8 minutes on an H100 (not yet timed on one:
    derived, ~1-2 minutes per size); ``DRY`` is the CPU check."""

    runs: int  # acts (and routes) per latency median
    warmup: int  # untimed calls before each timed series or memory phase (0: none)
    batches: tuple[int, ...]  # act_batch sizes
    batch_reps: int  # timed act_batch calls per size
    embed_samples: int  # screenshots for the embedding throughput
    max_new_tokens: int  # every generation makes exactly this many tokens


FULL = Plan(runs=5, warmup=2, batches=(1, 8, 32), batch_reps=3, embed_samples=64, max_new_tokens=32)
# The dry run proves the script works on the real code path; on 2 busy CPU cores a 100M model
# needs ~1 s per prefill and ~0.3 s per new token, so it does everything once and generates 4 tokens.
DRY = Plan(runs=1, warmup=0, batches=(1, 2), batch_reps=1, embed_samples=4, max_new_tokens=4)


_T0 = time.perf_counter()


def log(msg: str) -> None:
    """A progress line, with the seconds since this process started."""
    print(f"{time.perf_counter() - _T0:6.1f}s {msg}", flush=True)


# ---- device, memory, timing -----------------------------------------------------------------

def _proc_status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class Meter:
    """Peak memory of a phase and synchronised wall time, on CUDA or CPU."""

    def __init__(self, device) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.kind = ("cuda max_memory_allocated" if self.cuda
                     else "cpu peak RSS (VmHWM after /proc/self/clear_refs)")

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self) -> float | None:
        """Begin a phase: collect garbage, reset the peak. Returns the resident MiB at its start."""
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()
            return self.torch.cuda.memory_allocated() / MIB
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            return None
        return _proc_status_mib("VmRSS")

    def peak(self) -> float | None:
        """Peak MiB since :meth:`start` (None where the CPU peak cannot be reset)."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() / MIB
        try:
            Path("/proc/self/clear_refs").stat()
        except OSError:
            return None
        return bench_engine._hwm_mib()

    def phase(self, fn: Callable[[], object]) -> tuple[object, dict]:
        """Run ``fn`` as one memory phase: ``(result, {"resident_mib", "peak_mib", "seconds"})``."""
        resident = self.start()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, {"resident_mib": _r(resident), "peak_mib": _r(self.peak()),
                     "seconds": round(time.perf_counter() - t0, 3)}

    def timed(self, fn: Callable[[], object]) -> tuple[object, float]:
        """``(fn(), milliseconds)`` with the device synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, (time.perf_counter() - t0) * 1e3


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(float(x), nd)


def _median(xs) -> float:
    return round(statistics.median(xs), 2)


def _repeat(fn: Callable[[], object], n: int) -> list:
    return [fn() for _ in range(n)]


# ---- model, processor, adapters, screenshots ----------------------------------------------------

def model_parts(size: str, work: Path):
    """``(Qwen3VLConfig, processor, label, folder)`` for a published size or a :mod:`vlrouter.core.tiny` preset.

    The processor is loaded by :func:`vlrouter.core.encoder.load_processor` from ``folder``,
    laid out like a checkpoint's, as the engine loads it (``router embed``'s worker
    processes load it from there too).
    """
    from transformers import AutoConfig

    from vlrouter.core.encoder import load_processor
    from vlrouter.core.tiny import PRESETS, build_tiny_model

    if size in PUBLISHED:
        folder = build_tiny_model(work / "processor", "tiny")  # tokenizer + chat template (+ a tiny model, unused)
        cfg_path = folder / "processor_config.json"
        data = json.loads(cfg_path.read_text())
        data["image_processor"].update(copy.deepcopy(PUBLISHED_IMAGE_PROCESSOR))
        cfg_path.write_text(json.dumps(data, indent=2))
        processor = load_processor(str(folder))
        return (build_config(size, processor.tokenizer), processor, f"Qwen3-VL-{size.upper()}-Instruct architecture",
                folder)
    if size in PRESETS:
        folder = build_tiny_model(work / size, size)  # its saved weights are not used: the model is built below
        return (AutoConfig.from_pretrained(str(folder)), load_processor(str(folder)), f"vlrouter tiny preset {size!r}",
                folder)
    raise SystemExit(f"unknown size {size!r} (fix: one of {', '.join(PUBLISHED)} or a tiny preset: "
                     f"{', '.join(PRESETS)})")


def build_config(size: str, tokenizer):
    """The published config of ``size`` with ``tokenizer``'s special-token ids."""
    from transformers import Qwen3VLConfig

    data = copy.deepcopy(PUBLISHED[size])
    ids = tokenizer.convert_tokens_to_ids
    data.update(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    data["text_config"].update(bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                               pad_token_id=ids("<|endoftext|>"))
    if len(tokenizer) > data["text_config"]["vocab_size"]:
        raise SystemExit(f"tokenizer has {len(tokenizer)} ids, more than the config's vocabulary")
    return Qwen3VLConfig.from_dict(data)


def build_model(config, processor, device, dtype, seed: int):
    """Random weights straight on ``device`` (no CPU copy, no checkpoint), frozen, eval mode."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    return model


def add_loras(base, names: list[str], seed: int):
    """ONE PeftModel over ``base`` (modified in place) with a random non-zero LoRA per name."""
    import torch
    from peft import LoraConfig, get_peft_model

    def cfg():
        return LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          init_lora_weights=False, inference_mode=True)

    torch.manual_seed(seed)
    model = get_peft_model(base, cfg(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, cfg())
    model.eval()
    model.requires_grad_(False)
    return model


def write_screenshots(folder: Path, n: int):
    """``n`` synthetic 1280x720 screenshots (the demo's four tasks in turn) as PNG files + ``Sample`` rows."""
    from PIL import Image

    from vlrouter.core.data import Sample
    from vlrouter.demo.screens import TASKS, render_sample

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        task = TASKS[i % len(TASKS)]
        s = render_sample(task, random.Random(f"gpu-bench:{task}:{i}"), i)
        path = folder / f"{s.id}.png"
        s.image.resize(SCREEN, Image.Resampling.BICUBIC).save(path)  # the demo draws 320-480 px wide screens
        rows.append(Sample(id=s.id, image=str(path), prompt=s.instruction, target=s.action, adapter=task,
                           label=ADAPTERS.index(task), source=str(path)))
    return rows


def fit_head(feats, labels):
    """A router head (standardize -> linear) for ``feats``: nearest class centroid, in closed form.

    ``argmax(W z + b)`` with ``W`` the standardized class means and ``b = -|mean|^2 / 2`` is
    ``argmin |z - mean|``, so screenshots route to their own task's adapter as a trained
    router's would -- without a training loop, which would only cost time here.
    """
    import torch

    from vlrouter.core.head import HeadShape, build_head

    shape = HeadShape(kind="linear", in_dim=int(feats.shape[1]), num_labels=len(ADAPTERS))
    head = build_head(shape)
    x = torch.nan_to_num(feats.float())
    head[0].fit(x)
    with torch.no_grad():
        z = head[0](x)
        means = torch.stack([z[labels == k].mean(0) if bool((labels == k).any()) else torch.zeros(z.shape[1])
                             for k in range(len(ADAPTERS))])
        head[1].weight.copy_(means)
        head[1].bias.copy_(-0.5 * means.pow(2).sum(1))
    return head.eval(), shape


# ---- one size (a fresh process) --------------------------------------------------------------------

def measure(size: str, plan: Plan, dry_run: bool, work: Path) -> dict:
    import peft
    import torch
    import transformers
    from PIL import Image

    import vlrouter
    from vlrouter.core.encoder import Encoder, build_inputs
    from vlrouter.core.engine import Engine
    from vlrouter.core.features import collate, embed_dataset, prepare_shard
    from vlrouter.core.head import build_head
    from vlrouter.core.options import auto_workers
    from vlrouter.core.registry import TrainSection
    from vlrouter.core.store import RouterMeta
    from vlrouter.core.views import TokenIds, encode_pooled, inner_vl_model

    bench_engine._quiet()
    t_start = time.perf_counter()
    cuda = not dry_run
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    meter = Meter(device)
    gen = {"max_new_tokens": plan.max_new_tokens, "min_new_tokens": plan.max_new_tokens, "do_sample": False}
    tag = f"[{size}]"

    config, processor, label, folder = model_parts(size, work)
    text_cfg = config.text_config
    n_layers = int(text_cfg.num_hidden_layers)
    hidden = int(text_cfg.hidden_size)
    where = torch.cuda.get_device_name(device) if cuda else "cpu"
    log(f"{tag} {label}: {n_layers} text layers, hidden {hidden}, vision depth {config.vision_config.depth}; "
        f"{where}, {str(dtype).replace('torch.', '')}")

    samples = write_screenshots(work / "screens", plan.embed_samples)
    images = [Image.open(s.image).convert("RGB") for s in samples]
    prompts = [s.prompt for s in samples]
    one = build_inputs(processor, [images[0]], [prompts[0]])
    grid = one["image_grid_thw"][0].tolist()
    merge = int(config.vision_config.spatial_merge_size)
    image_tokens = int(grid[0] * grid[1] * grid[2] // (merge * merge))
    prompt_tokens = int(one["input_ids"].shape[1])

    # 1. base alone -------------------------------------------------------------------------------
    (base, build) = meter.phase(lambda: build_model(config, processor, device, dtype, seed=0))
    base_params = sum(p.numel() for p in base.parameters())
    vision_params = sum(p.numel() for p in inner_vl_model(base).visual.parameters())
    log(f"{tag} built {_count(base_params)} parameters in {build['seconds']:.1f}s; "
        f"{image_tokens} image tokens, {prompt_tokens} prompt tokens for one {SCREEN[0]}x{SCREEN[1]} screenshot")

    def base_generate():
        batch = {k: v.to(device) for k, v in build_inputs(processor, [images[0]], [prompts[0]]).items()}
        with torch.inference_mode():
            return base.generate(**batch, **gen).shape[1] - batch["input_ids"].shape[1]

    for _ in range(min(plan.warmup, 1)):  # kernels, cuBLAS workspaces: outside the measured phase
        base_generate()
    new_tokens, mem_base = meter.phase(base_generate)
    log(f"{tag} base alone: peak {mem_base['peak_mib']} MiB ({new_tokens} new tokens)")

    # 2. embedding throughput, as `router embed` runs it ------------------------------------------------
    defaults = TrainSection()
    encoder = Encoder(model=base, processor=processor, base_model=str(folder))
    workers = auto_workers()[0]
    if plan.warmup:  # one forward at the embedding batch size
        encoder.embed_prepared(collate(prepare_shard(str(folder), samples[:defaults.embed_batch_size],
                                                     processor=processor), processor.tokenizer.pad_token_id or 0),
                               [-1])
    (views, stats), mem_embed = meter.phase(lambda: embed_dataset(
        encoder, samples, work / "features", layers=[-1], workers=workers, batch_size=defaults.embed_batch_size))
    feats = views[f"mean@{n_layers}"]
    embed_s = mem_embed["seconds"]
    batches = [collate(prepare_shard(str(folder), samples[i:i + defaults.embed_batch_size], processor=processor),
                       processor.tokenizer.pad_token_id or 0)
               for i in range(0, len(samples), defaults.embed_batch_size)]
    _, fwd_ms = meter.timed(lambda: [encoder.embed_prepared(b, [-1]) for b in batches])
    batches = None  # ~20 MB of pixels per screenshot
    embed = {"samples": len(samples), "workers": stats["workers"], "batch_size": defaults.embed_batch_size,
             "seconds": round(embed_s, 3), "samples_per_s": round(len(samples) / embed_s, 2),
             "embedded_new": stats["embedded_new"], "forward_only_seconds": round(fwd_ms / 1e3, 3),
             "forward_only_samples_per_s": round(len(samples) / (fwd_ms / 1e3), 2),
             "features_finite": bool(torch.isfinite(feats).all()), "peak_mib": mem_embed["peak_mib"],
             "resident_mib": mem_embed["resident_mib"]}
    log(f"{tag} router embed: {embed['samples_per_s']} samples/s end to end ({len(samples)} screenshots, "
        f"{embed['workers']} worker(s), batch {embed['batch_size']}); forward only "
        f"{embed['forward_only_samples_per_s']} samples/s")

    # 3. a router head on those features -------------------------------------------------------------------
    labels = torch.tensor([s.label for s in samples])
    head, shape = fit_head(feats, labels)
    meta = RouterMeta(adapters=ADAPTERS, base_model=label, pooling=["mean"], layer=n_layers, num_layers=n_layers,
                      hidden_size=hidden, head=shape)

    # 4. the Engine: one base + 4 adapters ---------------------------------------------------------------------
    model, lora = meter.phase(lambda: add_loras(base, ADAPTERS, seed=1))
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    lora_mib = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n) / MIB
    engine = Engine(model, processor, head, meta)
    vision_calls: list[int] = []
    hook = inner_vl_model(model).visual.register_forward_hook(lambda *a: vision_calls.append(1))

    for _ in range(min(plan.warmup, 1)):
        engine.act(images[0], prompts[0], **gen)
    _, mem_engine = meter.phase(lambda: engine.act(images[0], prompts[0], **gen))
    log(f"{tag} Engine with {len(ADAPTERS)} adapters ({lora_params / 1e6:.1f}M LoRA parameters, added in "
        f"{lora['seconds']:.1f}s): peak {mem_engine['peak_mib']} MiB")

    for i in range(plan.warmup):
        engine.act(images[i % len(images)], prompts[i % len(prompts)], **gen)
    rows, calls, prep = [], [], []
    for i in range(plan.runs):
        img, prompt = images[i % len(images)], prompts[i % len(prompts)]
        _, ms = meter.timed(partial(build_inputs, processor, [img], [prompt]))
        prep.append(ms)
        vision_calls.clear()
        meter.sync()
        rows.append(engine.act(img, prompt, **gen).timings)
        calls.append(len(vision_calls))
    latency = {k: _median(r[k] for r in rows) for k in ("route_ms", "generate_ms", "total_ms")}
    latency.update(preprocess_ms=_median(prep), vision_calls_per_act=statistics.median(calls), runs=plan.runs,
                   warmup=plan.warmup)
    log(f"{tag} act: route {latency['route_ms']} ms (preprocessing {latency['preprocess_ms']} ms), generate "
        f"{latency['generate_ms']} ms, total {latency['total_ms']} ms; {latency['vision_calls_per_act']:g} "
        "vision-tower call(s) per act")

    early = n_layers // 2
    torch.manual_seed(2)
    engines = {-1: engine, early: Engine(model, processor, build_head(shape).eval(), meta.model_copy(update={
        "layer": early}))}  # early exit: the routing pass stops after layer `early`
    route_layers = {}
    for layer, eng in engines.items():
        for i in range(plan.warmup):
            eng.route(images[i % len(images)], prompts[i % len(prompts)])
        times = [meter.timed(partial(eng.route, images[i % len(images)], prompts[i % len(prompts)]))[1]
                 for i in range(plan.runs)]
        route_layers["last" if layer == -1 else "early"] = {  # layer: hidden_states index, of text_layers
            "layer": n_layers if layer == -1 else layer, "route_ms": _median(times)}
    log(f"{tag} route at the last layer ({n_layers}): {route_layers['last']['route_ms']} ms; at layer {early}: "
        f"{route_layers['early']['route_ms']} ms")

    act_batch = []
    for b in plan.batches:
        items = [(images[i % len(images)], prompts[i % len(prompts)]) for i in range(b)]
        for _ in range(min(plan.warmup, 1)):  # at this batch size
            engine.act_batch(items, **gen)
        calls_acts, mem_b = meter.phase(partial(_repeat, partial(engine.act_batch, items, **gen), plan.batch_reps))
        timings = [acts[0].timings for acts in calls_acts]
        adapters = {a.adapter for acts in calls_acts for a in acts}
        total = _median(t["total_ms"] for t in timings)
        act_batch.append({"batch": b, "total_ms": total, "route_ms": _median(t["route_ms"] for t in timings),
                          "generate_ms": _median(t["generate_ms"] for t in timings),
                          "samples_per_s": round(b / (total / 1e3), 2), "adapters_in_batch": len(adapters),
                          "vision_calls": timings[0]["vision_calls"], "reps": plan.batch_reps,
                          "peak_mib": mem_b["peak_mib"]})
        log(f"{tag} act_batch {b}: {total} ms, {act_batch[-1]['samples_per_s']} samples/s, "
            f"{len(adapters)} adapter(s), peak {mem_b['peak_mib']} MiB")
    hook.remove()

    # 5. the seed's design: a second base for routing -----------------------------------------------------------
    router_base, second = meter.phase(lambda: build_model(config, processor, device, dtype, seed=0))

    def seed_request():
        batch = {k: v.to(device) for k, v in build_inputs(processor, [images[0]], [prompts[0]]).items()}
        ids = TokenIds.of(router_base, processor)
        feat = encode_pooled(router_base, batch, layer=-1, pooling="mean", token_ids=ids)
        with torch.inference_mode():
            name = ADAPTERS[int(head(feat.float()).argmax(-1)[0])]
            model.set_adapter(name)
            model.generate(**batch, **gen)

    for _ in range(min(plan.warmup, 1)):
        seed_request()
    _, mem_seed = meter.phase(seed_request)
    log(f"{tag} seed design (two base copies): peak {mem_seed['peak_mib']} MiB")

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "python": platform.python_version(), "vlrouter": vlrouter.__version__,
                "cuda": torch.version.cuda if cuda else None}
    device_name = where if cuda else "cpu (dry run)"
    device_mib = (torch.cuda.get_device_properties(device).total_memory / MIB) if cuda else None
    return {
        "size": size, "model": label, "config_source": CONFIG_SOURCE.get(size, "vlrouter/core/tiny.py"),
        "dry_run": dry_run, "device": device_name, "device_memory_mib": _r(device_mib),
        "device_type": device.type, "dtype": str(dtype).replace("torch.", ""), "cpu_count": os.cpu_count(),
        "versions": versions, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": os.environ.get(COMMAND_ENV, "bash bench/gpu/run"),
        "config": {"plan": asdict(plan), "screenshot": list(SCREEN), "image_tokens": image_tokens,
                   "prompt_tokens": prompt_tokens, "adapters": ADAPTERS,
                   "lora": {"rank": LORA_RANK, "alpha": 2 * LORA_RANK, "targets": LORA_TARGETS},
                   "text_layers": n_layers, "hidden_size": hidden, "vision_depth": int(config.vision_config.depth),
                   "vocab_size": int(text_cfg.vocab_size), "attn_implementation": base.config._attn_implementation,
                   "processor": f"{type(processor).__name__} + {type(processor.image_processor).__name__}"},
        "params": {"base": base_params, "vision": vision_params, "lora_4_adapters": lora_params,
                   "base_weights_mib": _r(sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                                              if "lora_" not in n) / MIB), "lora_mib": _r(lora_mib)},
        "build_s": build["seconds"],
        "memory": {"kind": meter.kind, "base": mem_base, "engine": mem_engine, "seed": mem_seed,
                   "lora_add": lora, "second_base_build": second},
        "latency": latency, "route_layers": route_layers, "act_batch": act_batch, "embed": embed,
        "seconds": round(time.perf_counter() - t_start, 1),
    }


# ---- rendering (bench/report.py puts this in the README) ----------------------------------------------------

def _gib(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib / 1024:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or not b else f"{a / b:.2f}x"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def _model_cell(r: dict) -> str:
    return f"{r['model'].replace(' architecture', '')} ({_count(r['params']['base'])}, {r['dtype']})"


def render(results: list[dict]) -> str:
    """The markdown tables of one or more ``gpu-<size>.json`` results (what the README shows)."""
    results = sorted(results, key=lambda r: r["params"]["base"])
    if not results:
        return ""
    p0 = results[0]["config"]
    tokens = p0["plan"]["max_new_tokens"]
    shot = f"{p0['screenshot'][0]}x{p0['screenshot'][1]}"
    lines = [
        f"#### Memory: peak during one request on a {shot} screenshot (GiB; weights + activations)",
        "",
        "| model | base alone | **Engine, 4 adapters (one shared base)** | seed design: 2nd base copy for routing "
        "| Engine vs base | seed vs base |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        m = r["memory"]
        b, e, s = (m[k]["peak_mib"] for k in ("base", "engine", "seed"))
        lines.append(f"| {_model_cell(r)} | {_gib(b)} | {_gib(e)} | {_gib(s)} | {_ratio(e, b)} | {_ratio(s, b)} |")
    lines += [
        "",
        f"#### Latency: one {shot} screenshot, greedy, {tokens} new tokens (median ms)",
        "",
        "| model | route (of it: CPU preprocessing) | generate | total | vision-tower calls / act "
        "| route, router at last layer | route, router at middle layer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat, rl = r["latency"], r["route_layers"]
        lines.append(
            f"| {_model_cell(r)} | {lat['route_ms']:.1f} ({lat['preprocess_ms']:.1f}) | {lat['generate_ms']:.1f} | "
            f"{lat['total_ms']:.1f} | {lat['vision_calls_per_act']:g} | "
            f"{rl['last']['route_ms']:.1f} (layer {rl['last']['layer']}) | "
            f"{rl['early']['route_ms']:.1f} (layer {rl['early']['layer']} of {r['config']['text_layers']}) |")
    sizes = sorted({a["batch"] for r in results for a in r["act_batch"]})
    lines += [
        "",
        f"#### Throughput (samples/s): `act_batch` ({tokens} new tokens, mixed adapters) and `router embed`",
        "",
        "| model | " + " | ".join(f"act_batch {b}" for b in sizes)
        + " | router embed, end to end | embed, forward only |",
        "|---|" + "---:|" * (len(sizes) + 2),
    ]
    for r in results:
        by = {a["batch"]: a for a in r["act_batch"]}
        cells = [f"{by[b]['samples_per_s']:.2f}" if b in by else "-" for b in sizes]
        e = r["embed"]
        lines.append(f"| {_model_cell(r)} | " + " | ".join(cells)
                     + f" | {e['samples_per_s']:.2f} ({e['samples']} screenshots, {e['workers']} worker(s), "
                       f"batch {e['batch_size']}) | {e['forward_only_samples_per_s']:.2f} |")
    lines.append("")
    for r in results:
        v = r["versions"]
        dev = r["device"] + (f" ({r['device_memory_mib'] / 1024:.0f} GiB)" if r.get("device_memory_mib") else "")
        cuda = f" (CUDA {v['cuda']})" if v.get("cuda") else ""
        lines.append(f"- `gpu-{r['size']}.json`: {dev}; torch {v['torch']}{cuda}, transformers {v['transformers']}, "
                     f"peft {v['peft']}, Python {v['python']}; {r['date'][:10]}; `{r['command']}`; "
                     f"{r['seconds']:.0f} s for this size.")
    return "\n".join(lines)


# ---- driver ------------------------------------------------------------------------------------------

def result_path(out: Path, size: str) -> Path:
    return out / f"gpu-{size}.json"


def child(size: str, dry_run: bool, out: Path) -> None:
    plan = DRY if dry_run else FULL
    with tempfile.TemporaryDirectory(prefix=f"vlrouter-gpu-{size}-") as tmp:
        results = measure(size, plan, dry_run, Path(tmp))
    path = result_path(out, size)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(partial, path)
    log(f"[{size}] wrote {path} ({results['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", help="comma-separated: 2b, 8b (default 2b,8b), or a tiny preset (dry run: 100m)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, fp32, fewer repetitions; default size 100m")
    ap.add_argument("--out", help="results folder (default: bench/results; a new temp folder for --dry-run)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve() if args.out else (
        Path(tempfile.mkdtemp(prefix="vlrouter-gpu-dry-")) if args.dry_run else RESULTS)
    if args.dry_run and out == RESULTS.resolve():
        raise SystemExit("--dry-run never writes into bench/results (fix: --out a scratch folder)")
    if args.child:
        child(args.child, args.dry_run, out)
        return 0

    sizes = [s.strip() for s in (args.sizes or ("100m" if args.dry_run else "2b,8b")).split(",") if s.strip()]
    if not args.dry_run:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                               capture_output=True, text=True, check=False)
        if probe.stdout.strip() != "True":
            raise SystemExit("no CUDA device visible to torch (fix: run on a GPU machine, or `--dry-run` on CPU)")
    out.mkdir(parents=True, exist_ok=True)
    os.environ[COMMAND_ENV] = " ".join(["bash bench/gpu/run", *(sys.argv[1:] if argv is None else argv)])
    log(f"vlrouter GPU benchmark: sizes {', '.join(sizes)}; {'dry run (CPU)' if args.dry_run else 'CUDA'}; "
        f"results in {out}")
    t0 = time.perf_counter()
    failed = []
    for size in sizes:  # one fresh process per size: clean peak statistics; a crash keeps the sizes before it
        cmd = [sys.executable, __file__, "--child", size, "--out", str(out)] + (["--dry-run"] if args.dry_run else [])
        if subprocess.run(cmd, check=False).returncode != 0:
            failed.append(size)
            log(f"[{size}] FAILED (see above); continuing")
    done = [json.loads(result_path(out, s).read_text()) for s in sizes
            if s not in failed and result_path(out, s).exists()]
    if done:
        print("\n" + render(done), flush=True)
    if not args.dry_run and out == RESULTS.resolve() and done:
        import report  # bench/report.py: the README's benchmark blocks

        report.update_readme()
        log("README.md updated (bench/report.py --update-readme)")
    log(f"done: {len(done)} of {len(sizes)} size(s) in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
