"""Content-addressed feature cache: embed only what is missing.

This replaces the seed's preprocessing step, which saved one ``.pt`` pickle per
sample holding the full processor output (``input_ids``, ``pixel_values``, …) and
ran the encoder again on every training run. Here the *pooled views* of one forward
pass -- ``H`` floats each (4096 for Qwen3-VL-8B) instead of a pixel tensor of megabytes
-- are stored, once, under a key that names exactly what produced them::

    key = sha256(encoder.fingerprint(), image_digest(decoded pixels), prompt)
    <cache_dir>/<encoder_fp>/<key[:2]>/<key>.safetensors   (one tensor per view@layer, e.g. "image-mean@2")

so the same screenshot + instruction is never embedded twice: not on a re-run, not
after an interrupted run (entries are written atomically, temp file + ``os.replace``,
so a crash leaves whole entries or none), not when an adapter is added (only its
samples are new), not across routing datasets, and not when the router's pooling or
layer changes (every view of the embedded layers is in the entry). Anything that changes
a view -- base weights, processor settings, dtype, the entry format -- changes the
encoder fingerprint and so the folder: entries of the old single-vector format live in
another folder and are re-embedded, never misread. An entry missing a layer that is
asked for later is re-embedded and rewritten with the union.

Two stages, kept apart so a remote backend can fan the CPU stage out:

* :func:`prepare_shard` -- CPU only: decode images, chat template, image processor,
  tokenizer; per-sample tensors. Runs in a pool of ``workers`` processes (spawn
  context; each loads the processor once in its initializer).
* the forward + pooling in the main process (:meth:`Encoder.embed_prepared`) on
  batches built by :func:`collate` (left padding, identical to processing the batch
  at once).

:func:`embed_dataset` drives both and returns features in sample order.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrouter.core.atomic import atomic_target
from vlrouter.core.encoder import Encoder, build_inputs, load_processor, prompt_token_limit, set_prompt_token_limit
from vlrouter.core.errors import ImageError, InputError, TrainingError, located
from vlrouter.core.images import image_digest, open_image
from vlrouter.core.progress import Progress, progress_or_null
from vlrouter.core.views import CACHED_VIEWS, LAYOUT, resolve_layer, view_key, view_width

if TYPE_CHECKING:
    import torch

    from vlrouter.core.data import Sample

SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
MP_CONTEXT = "spawn"  # never fork a process that holds torch threads / a model
# Worker processes start only for at least this many samples to decode/process: each
# spawned worker imports torch + transformers (seconds), more than small batches cost.
POOL_MIN_SAMPLES = 32


_VIEW_NAME = re.compile(r"[a-z-]+@\d+")


def feature_key(encoder_fp: str, image_digest: str, prompt: str) -> str:
    """The cache key of one sample under one encoder."""
    h = hashlib.sha256()
    for part in (encoder_fp, image_digest, prompt):
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


class FeatureCache:
    """One folder per encoder fingerprint; one safetensors file per sample holding its views."""

    def __init__(self, root: str | Path, encoder_fp: str) -> None:
        self.root = Path(root)
        self.encoder_fp = encoder_fp
        self.dir = self.root / encoder_fp

    def path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def get_all(self, key: str) -> dict[str, torch.Tensor] | None:
        """Every view stored for ``key``; None when absent or unreadable (then it is simply embedded again)."""
        from safetensors.torch import load_file

        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return load_file(str(p))
        except Exception:
            return None

    def get(self, key: str, names: Sequence[str]) -> dict[str, torch.Tensor] | None:
        """The views ``names`` of ``key``; None when the entry lacks any of them."""
        entry = self.get_all(key)
        if entry is None or any(n not in entry for n in names):
            return None
        return {n: entry[n] for n in names}

    def put(self, key: str, views: dict[str, torch.Tensor], *, meta: dict[str, str] | None = None) -> Path:
        """Write one entry atomically (temp file in the same folder, then ``os.replace``), keeping views
        already stored for ``key`` that ``views`` does not replace."""
        from safetensors.torch import save_file

        fresh = {n: t.detach().float().cpu().contiguous() for n, t in views.items()}
        width = {n: int(t.shape[0]) for n, t in fresh.items()}
        old = {n: t for n, t in (self.get_all(key) or {}).items() if _VIEW_NAME.fullmatch(n)}
        hidden = min((w for n, w in width.items() if not n.startswith(f"{LAYOUT}@")), default=None)  # plain: H wide
        merged = {n: t for n, t in old.items() if hidden is not None and usable_views({n: t}, hidden)}
        merged.update(fresh)
        p = self.path(key)
        with atomic_target(p) as tmp:
            save_file(merged, str(tmp), metadata={"encoder": self.encoder_fp, **(meta or {})})
        return p

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*/*.safetensors")) if self.dir.is_dir() else 0


# ---- the CPU stage (also run in worker processes) ------------------------------------------

_PROCESSORS: dict[tuple[str, str | None], Any] = {}


def _processor_for(base_model: str, revision: str | None = None):
    key = (base_model, revision)
    if key not in _PROCESSORS:
        _PROCESSORS[key] = load_processor(base_model, revision=revision)
    return _PROCESSORS[key]


def _worker_init(base_model: str, revision: str | None, max_prompt_tokens: int | None = None) -> None:
    """Pool initializer: one torch thread per worker, processor loaded once (with the run's prompt limit)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass
    proc = _processor_for(base_model, revision)
    if max_prompt_tokens is not None:
        set_prompt_token_limit(proc, max_prompt_tokens)


def _open(sample: Sample):
    try:
        return open_image(sample.image, where=f"{sample.source} image")
    except ImageError as e:
        raise ImageError(located(None, None, f"{e}; the image changed since the routing dataset was built",
                                 fix="restore it, or run `router build-dataset` again to skip it")) from None


def digest_shard(samples: Sequence[Sample]) -> list[str]:
    """Pixel digests (:func:`vlrouter.core.images.image_digest`) of each sample's image."""
    return [image_digest(_open(s)) for s in samples]


def prepare_shard(base_model: str, samples: Sequence[Sample], *, revision: str | None = None,
                  processor=None) -> list[dict[str, torch.Tensor]]:
    """CPU stage for a shard: per-sample processor outputs (each with batch dim 1).

    Loads the processor for ``base_model`` once per process (or uses ``processor``).
    :func:`collate` turns any list of these into a model batch.
    """
    proc = processor if processor is not None else _processor_for(base_model, revision)
    out = []
    for s in samples:
        try:
            batch = build_inputs(proc, [_open(s)], [s.prompt])
        except InputError as e:  # a prompt refused by the encoder's check: name the dataset line
            raise InputError(f"{s.source}: {e}") from None
        out.append({k: v for k, v in batch.items()})
    return out


def collate(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the sequence tensors and concatenate the image tensors of per-sample outputs.

    Equal to processing the samples as one batch with the processor (left padding).
    """
    import torch

    if not items:
        raise InputError(located(None, "collate", "no items", fix="pass at least one prepared sample"))
    longest = max(int(it["input_ids"].shape[1]) for it in items)
    out: dict[str, torch.Tensor] = {}
    for key in items[0]:
        tensors = [it[key] for it in items]
        if key in SEQ_KEYS:
            pad = pad_token_id if key == "input_ids" else 0
            rows = []
            for t in tensors:
                missing = longest - t.shape[1]
                if missing:
                    t = torch.cat([torch.full((t.shape[0], missing), pad, dtype=t.dtype), t], dim=1)
                rows.append(t)
            out[key] = torch.cat(rows, dim=0)
        else:
            out[key] = torch.cat(tensors, dim=0)
    return out


def embed_prepared_items(encoder: Encoder, cache: FeatureCache, keys: Sequence[str],
                         items: Sequence[dict[str, torch.Tensor]], layers: Sequence[int], *, batch_size: int = 8,
                         ids: Sequence[str] | None = None) -> list[dict[str, torch.Tensor]]:
    """GPU stage: forward per-sample items from :func:`prepare_shard` (made in any process or
    container) ``batch_size`` at a time, store every view at ``layers`` under each key; return
    the views per item, in order."""
    if len(keys) != len(items):
        raise InputError(located(None, "keys", f"{len(keys)} keys for {len(items)} prepared items",
                                 fix="pass one cache key per prepared item"))
    pad_id = encoder.processor.tokenizer.pad_token_id or 0
    out: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(items), batch_size):
        views = encoder.embed_prepared(collate(items[start:start + batch_size], pad_id), layers)
        for row, i in enumerate(range(start, min(start + batch_size, len(items)))):
            one = {name: t[row] for name, t in views.items()}
            cache.put(keys[i], one, meta={"id": str(ids[i])} if ids is not None else None)
            out.append(one)
    return out


# ---- driving both stages -------------------------------------------------------------------

def _chunks(seq: Sequence, size: int) -> list[Sequence]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _ordered_map(pool: Executor | None, fn, jobs: Iterable[tuple], window: int):
    """Yield ``fn(*job)`` in order; with a pool, keep at most ``window`` jobs in flight."""
    if pool is None:
        for job in jobs:
            yield fn(*job)
        return
    pending: deque = deque()
    for job in jobs:
        pending.append(pool.submit(fn, *job))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def make_pool(encoder: Encoder, workers: int) -> ProcessPoolExecutor | None:
    """A spawn-context process pool whose workers hold ``encoder``'s processor; None for 1 worker."""
    import multiprocessing as mp

    if workers <= 1:
        return None
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(MP_CONTEXT),
                               initializer=_worker_init, initargs=(encoder.base_model, encoder.revision,
                                                                   prompt_token_limit(encoder.processor)))


def _prepare_job(base_model: str, revision: str | None, samples: Sequence[Sample]):
    return prepare_shard(base_model, samples, revision=revision)


def sample_keys(encoder: Encoder, samples: Sequence[Sample], *, pool: Executor | None = None, workers: int = 1,
                progress: Progress | None = None, chunk: int = 16, encoder_fp: str | None = None) -> list[str]:
    """Cache keys of ``samples`` (decodes every image once, in the pool when given)."""
    fp = encoder_fp or encoder.fingerprint()
    prog = progress_or_null(progress)
    keys: list[str] = []
    with prog.task("hashing screenshots", total=len(samples)) as t:
        chunks = _chunks(list(samples), chunk)
        for part, digests in zip(chunks, _ordered_map(pool, digest_shard, ((c,) for c in chunks),
                                                      window=4 * workers)):
            keys.extend(feature_key(fp, d, s.prompt) for s, d in zip(part, digests))
            t.advance(len(part))
    return keys


def embed_dataset(encoder: Encoder, samples: Sequence[Sample], cache: FeatureCache | str | Path, *,
                  layers: Sequence[int], workers: int = 1, batch_size: int = 8,
                  progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every view at ``layers`` for ``samples``: ``{"view@layer": [N, H]}`` (fp32, sample order).

    Only cache misses are embedded: samples whose entry is absent, unreadable, or lacks one
    of the asked layers (it is then rewritten with the union). ``cache`` is a
    :class:`FeatureCache` for this encoder's fingerprint, or the cache root folder. Image
    decoding, hashing and the processor run in ``workers`` processes (in-process for 1, or
    while fewer than :data:`POOL_MIN_SAMPLES` samples need it: worker start-up costs
    seconds); the forward runs here, ``batch_size`` samples at a time, stopping after the
    deepest asked layer, and each entry is written as soon as its batch is done (an
    interrupted run resumes). Stats: ``embedded_new`` (samples embedded this time),
    ``reused_cached`` (samples found with every asked view), ``forwarded`` (distinct entries
    computed), ``seconds``, ``layers``.
    """
    import torch

    if batch_size < 1 or workers < 1:
        raise InputError(located(None, "batch_size/workers", f"must be >= 1 (got {batch_size}, {workers})",
                                 fix="train.embed_batch_size and train.workers are at least 1"))
    t0 = time.perf_counter()
    fp = encoder.fingerprint()
    if not isinstance(cache, FeatureCache):
        cache = FeatureCache(cache, fp)
    elif cache.encoder_fp != fp:
        raise InputError(located(cache.dir, None, f"this feature cache belongs to encoder {cache.encoder_fp}, not {fp}",
                                 fix="FeatureCache(root, encoder.fingerprint())"))
    n_layers = encoder.num_layers
    layers = sorted({resolve_layer(layer, n_layers) for layer in layers})
    names = [view_key(v, layer) for layer in layers for v in CACHED_VIEWS]
    prog = progress_or_null(progress)
    samples = list(samples)
    pool: ProcessPoolExecutor | None = None

    def pool_for(n: int) -> ProcessPoolExecutor | None:
        nonlocal pool
        if pool is None and workers > 1 and n >= POOL_MIN_SAMPLES:
            pool = make_pool(encoder, workers)
        return pool

    todo: list[tuple[str, Sample]] = []
    have: dict[str, dict[str, torch.Tensor]] = {}
    try:
        keys = sample_keys(encoder, samples, pool=pool_for(len(samples)), workers=workers, progress=progress,
                           encoder_fp=fp)
        missing: dict[str, Sample] = {}
        n_new = 0
        for s, k in zip(samples, keys):
            if k in have or k in missing:
                n_new += k in missing
                continue
            views = usable_views(cache.get(k, names), encoder.hidden_size)  # None: absent, damaged, short a layer
            if views is None:
                n_new += 1
                missing[k] = s
            else:
                have[k] = views
        todo = list(missing.items())
        if todo:
            chunks = _chunks(todo, batch_size)
            jobs = ((encoder.base_model, encoder.revision, [s for _, s in c]) for c in chunks)
            stage_pool = pool_for(len(todo))
            if stage_pool is None:
                run = lambda bm, rev, ss: prepare_shard(bm, ss, processor=encoder.processor)  # noqa: E731
            else:
                run = _prepare_job
            with prog.task("embedding new samples", total=len(todo)) as t:
                for part, prepared in zip(chunks, _ordered_map(stage_pool, run, jobs, window=2 * workers)):
                    views = embed_prepared_items(encoder, cache, [k for k, _ in part], prepared, layers,
                                                 batch_size=len(part), ids=[s.id for _, s in part])
                    have.update(zip((k for k, _ in part), views))
                    t.advance(len(part))
    except BrokenProcessPool as e:
        raise TrainingError(located(None, "train.workers", f"a feature worker process died ({e}); entries embedded "
                                    "so far are kept", fix="run again with train.workers: 1; in your own script, call "
                                    "this under `if __name__ == '__main__':`, which spawned workers need")) from None
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    h = encoder.hidden_size
    feats = {n: torch.stack([have[k][n] for k in keys]) if keys else torch.zeros(0, _width(n, h)) for n in names}
    stats = {"embedded_new": n_new, "reused_cached": len(samples) - n_new, "forwarded": len(todo),
             "seconds": round(time.perf_counter() - t0, 3), "workers": workers if pool is not None else 1,
             "layers": layers}
    prog.log(f"features: embedded {stats['embedded_new']} new, reused {stats['reused_cached']} cached")
    return feats, stats


def _width(name: str, hidden: int) -> int:
    """Floats in the view ``name`` (``image-grid@2``: 4 x H; ``layout@2``: LAYOUT_DIM) of a model ``hidden`` wide."""
    return view_width(name.split("@")[0], int(hidden))


def usable_views(views: dict[str, torch.Tensor] | None, dim: int) -> dict[str, torch.Tensor] | None:
    """Cached views, or None when one is not a vector of finite floats of its view's width (then the sample
    is embedded again and the entry rewritten): a damaged or foreign entry must not break every later retrain."""
    import torch

    if views is None:
        return None
    for name, t in views.items():
        width = _width(name, dim)
        if t.ndim != 1 or int(t.shape[0]) != width or not torch.isfinite(t).all():
            return None
    return views


def check_features(views: dict[str, torch.Tensor], where: str | Path) -> None:
    """Refuse NaN/inf features (a broken base model or dtype overflow) before training on them."""
    import torch

    for name, feats in views.items():
        if feats.numel() and not torch.isfinite(feats).all():
            bad = int((~torch.isfinite(feats)).any(dim=1).sum())
            raise InputError(located(where, name, f"{bad} feature rows contain NaN/inf",
                                     fix="load the base model in float32 (router.dtype: float32)"))
