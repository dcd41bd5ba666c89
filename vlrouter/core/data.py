"""Adapter datasets (the seed's LLaVA-style JSONL) and the routing dataset built from them.

An adapter dataset is one JSON object per line::

    {"id": "cal-0001", "image": "images/0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nClick March 29 in the calendar"},
                       {"from": "gpt", "value": "click(x=412, y=230)"}],
     "metadata": {...}}

``image`` is relative to the JSONL file's folder (or absolute). The first human turn is
the instruction; its LLaVA ``<image>\\n`` prefix is stripped (the encoder always puts the
image first, as the seed's conversations do). The first gpt turn is the target action.

What happens to bad input -- each case is either an error naming the file and line,
or a skip that is counted and reported (the first few ids) -- never silent:

=========================================  ===========================================
input                                      outcome
=========================================  ===========================================
blank line                                 ignored
line that is not JSON                      DatasetError ``file:LINE``
line not UTF-8, nested too deep, or with   DatasetError ``file:LINE``
an integer over Python's digit limit
line that is JSON but not an object        DatasetError ``file:LINE``
no ``image`` / no ``conversations`` list   DatasetError ``file:LINE``
conversation without a human turn          DatasetError ``file:LINE``
human turn with no text after ``<image>``  DatasetError ``file:LINE``
image file missing                         skipped, counted (``Skipped.missing``)
image file corrupt / not an image / huge   skipped, counted (``Skipped.corrupt``); checked
                                           cheaply (header + PNG CRCs, no decode) for
                                           every sample that is drawn into the routing
                                           dataset, before anything is embedded
no usable sample left (empty file, or      DatasetError naming the file (with the skip
every sample skipped)                      counts)
adapter with < 2 usable samples            DatasetError naming adapter and file: one
                                           goes to train, one to val
only one adapter (one label)               DatasetError: a router needs >= 2 adapters
routing JSONL line without ``label``       DatasetError ``file:LINE``
=========================================  ===========================================

An image that was fine when the routing dataset was built but cannot be decoded at
embed time (changed on disk since) is an :class:`~vlrouter.core.errors.ImageError`
naming the routing JSONL line and the adapter dataset line it came from.

The routing dataset (``router build-dataset``) keeps the multimodal format and adds
``label`` (position in registry.yaml) and ``adapter`` (the name), in
``<datasets_dir>/routing_YYYYMMDD_HHMMSS/``: ``train.jsonl``, ``val.jsonl``,
``eval.jsonl`` (when ``eval_samples`` > 0) and ``metadata.json`` whose
``class_names`` flow into router.json (the seed's "Option 1").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlrouter.core.errors import DatasetError, located
from vlrouter.core.images import size_problem
from vlrouter.core.paths import check_regular_file
from vlrouter.core.progress import Progress, progress_or_null

if TYPE_CHECKING:
    from vlrouter.core.registry import Registry

IMAGE_TOKEN = "<image>"
# Qwen's chat-format special tokens look like <|im_start|>, <|image_pad|>, <|vision_end|>: text holding one
# would be read as chat structure (an extra image placeholder, a forged turn), so instructions may not.
SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>\s]{1,64}\|>")
_CR_ONLY = re.compile(r"\r(?!\n)")
SPLITS = ("train", "val", "eval")
METADATA_FILE = "metadata.json"
ROUTING_PREFIX = "routing_"
DATASET_FORMAT_VERSION = 1
_SHOW_IDS = 5


@dataclass
class Sample:
    """One (screenshot, instruction) pair, ready for the encoder."""

    id: str
    image: str  # absolute path
    prompt: str  # human text, ``<image>\n`` prefix stripped
    target: str | None  # first gpt turn (the action), if any
    adapter: str
    label: int | None = None  # set in routing datasets
    source: str = ""  # "file:line", for messages
    record: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the original object


@dataclass
class Skipped:
    """Samples left out of a dataset, by reason, with their ids."""

    file: str
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.corrupt)

    def __bool__(self) -> bool:
        return self.count > 0

    def summary(self) -> str:
        """``data/x.jsonl: skipped 3 samples: 2 missing images (ids a, b), 1 corrupt image (id c)``."""
        parts = []
        for what, ids in (("missing image", self.missing), ("corrupt image", self.corrupt)):
            if ids:
                shown = ", ".join(ids[:_SHOW_IDS]) + (f", … +{len(ids) - _SHOW_IDS}" if len(ids) > _SHOW_IDS else "")
                plural = "s" if len(ids) != 1 else ""
                parts.append(f"{len(ids)} {what}{plural} (id{plural} {shown})")
        return f"{self.file}: skipped {self.count} sample{'s' if self.count != 1 else ''}: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"missing": len(self.missing), "corrupt": len(self.corrupt),
                "missing_ids": self.missing[:_SHOW_IDS], "corrupt_ids": self.corrupt[:_SHOW_IDS]}


# ---- reading ---------------------------------------------------------------------------

def _turns(record: dict, where: str, line: int) -> tuple[str, str | None]:
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DatasetError(located(where, "conversations", "missing or not a non-empty list", line=line,
                                   fix='add "conversations": [{"from": "human", "value": "<image>\\n..."}]'))
    human = gpt = None
    for turn in conv:
        if not isinstance(turn, dict):
            raise DatasetError(located(where, "conversations", "a turn is not an object", line=line,
                                       fix='each turn is {"from": "human"|"gpt", "value": "..."}'))
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role in ("human", "user") and human is None:
            human = value
        elif role in ("gpt", "assistant") and gpt is None:
            gpt = value
    if human is None:
        raise DatasetError(located(where, "conversations", "no human turn (the instruction)", line=line,
                                   fix='add {"from": "human", "value": "<image>\\nINSTRUCTION"} as the first turn'))
    if not isinstance(human, str):
        raise DatasetError(located(where, "conversations", "the human turn's value is not text", line=line,
                                   fix="make it a string"))
    prompt = strip_image_token(human)
    if not prompt:
        raise DatasetError(located(where, "conversations", "the human turn has no instruction after <image>",
                                   line=line, fix='write the instruction, e.g. "<image>\\nClick March 29"'))
    problem = prompt_problem(prompt)
    if problem:
        raise DatasetError(located(where, "conversations", f"the instruction {problem}", line=line,
                                   fix="remove it from the human turn"))
    return prompt, gpt if isinstance(gpt, str) else None


def prompt_problem(text: str) -> str | None:
    """Why ``text`` cannot be an instruction (lone surrogate, a chat special token), or None.

    Shared by the dataset reader (an error naming file:line) and the encoder's formatting
    (:func:`vlrouter.core.encoder.check_prompts`), so training and inference refuse the same text.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text (a lone surrogate at character {e.start})"
    m = SPECIAL_TOKEN_RE.search(text)
    if m:
        return f"holds the special token {m.group(0)!r}, which the model's chat format reserves"
    return None


def strip_image_token(text: str) -> str:
    """Drop the LLaVA ``<image>`` placeholder (usually a ``<image>\\n`` prefix) and surrounding space."""
    text = text.strip()
    if text.startswith(IMAGE_TOKEN):
        text = text[len(IMAGE_TOKEN):]
    return text.replace(IMAGE_TOKEN, "").strip()


def _iter_records(path: Path):
    """Yield ``(line_no, record)`` for every non-blank line; errors name file:line."""
    check_regular_file(path, what="dataset", error=DatasetError, fix="point at a .jsonl file")
    try:
        fh = path.open("rb")  # decoded line by line, so a bad byte is reported on its own line
    except FileNotFoundError:
        raise DatasetError(located(path, None, "dataset file not found",
                                   fix="check the adapter's `dataset:` in registry.yaml")) from None
    except (IsADirectoryError, PermissionError) as e:
        raise DatasetError(located(path, None, f"cannot read: {e.strerror}", fix="point at a .jsonl file")) from None
    with fh:
        line_no = 0
        for raw in fh:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(located(path, line_no + 1, f"not UTF-8 text ({e.reason} at byte {e.start} of "
                                           "the line)", fix="save the file as UTF-8")) from None
            for line in _CR_ONLY.split(text):  # a lone \r ends a line too (universal newlines)
                line_no += 1
                if line.strip():
                    yield line_no, _record(path, line_no, line)


def _record(path: Path, line_no: int, line: str) -> dict:
    """One JSONL line as a JSON object; errors name file:line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(located(path, line_no, f"not valid JSON: {e.msg} (column {e.colno})",
                                   fix="one JSON object per line (JSON Lines)")) from None
    except (ValueError, RecursionError) as e:  # an integer over the digit limit, nesting too deep
        raise DatasetError(located(path, line_no, f"JSON that cannot be read: {' '.join(str(e).split())}",
                                   fix="one flat JSON object per line (JSON Lines)")) from None
    if not isinstance(record, dict):
        raise DatasetError(located(path, line_no, f"expected a JSON object, got {type(record).__name__}",
                                   fix="one JSON object per line (JSON Lines)"))
    return record


def verify_image(path: str | Path) -> str | None:
    """Cheap integrity check without decoding pixels. ``None`` when fine, else the reason.

    Reads the header (size limits against decompression bombs) and, for PNG, every
    chunk's CRC (``Image.verify``): catches missing, truncated, garbled and non-image
    files at a fraction of a decode's cost.
    """
    import warnings

    from PIL import Image

    p = Path(path)
    if not p.is_file():  # also a FIFO or a device: never opened
        return "missing"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(p) as img:
                w, h = img.size
                problem = size_problem(w, h)
                if problem:
                    return problem[0]
                img.verify()
    except Exception as e:  # UnidentifiedImageError, SyntaxError (bad CRC), OSError (truncated), bombs
        return f"{type(e).__name__}: {e}"
    return None


def _parse(record: dict, path: Path, line_no: int, *, adapter: str | None) -> Sample:
    where = str(path)
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise DatasetError(located(where, "image", "missing or not a path string", line=line_no,
                                   fix='add "image": "images/xxx.png" (relative to the JSONL folder)'))
    prompt, target = _turns(record, where, line_no)
    try:
        img = Path(image).expanduser()
    except RuntimeError:  # "~user/..." for a user that does not exist: a path that is missing, so skipped
        img = Path(image)
    if not img.is_absolute():
        img = path.parent / img
    sid = record.get("id")
    sid = str(sid) if sid is not None else f"{path.name}:{line_no}"
    name = adapter if adapter is not None else record.get("adapter")
    return Sample(id=sid, image=os.path.abspath(img), prompt=prompt, target=target, adapter=str(name or ""),
                  source=f"{path}:{line_no}", record=record)


def read_adapter_dataset(path: str | Path, *, adapter: str,
                         verify_images: bool = True) -> tuple[list[Sample], Skipped]:
    """Read one adapter's JSONL. Returns ``(samples, skipped)``; see the module table for errors.

    Missing image files are always skipped (a cheap ``stat``); with ``verify_images``
    corrupt ones are too (:func:`verify_image`). :func:`build_routing_dataset` passes
    ``verify_images=False`` and verifies only the samples it draws.
    """
    p = Path(path)
    samples: list[Sample] = []
    skipped = Skipped(file=str(p))
    seen_any = False
    for line_no, record in _iter_records(p):
        seen_any = True
        s = _parse(record, p, line_no, adapter=adapter)
        if not os.path.isfile(s.image):
            skipped.missing.append(s.id)
            continue
        if verify_images and verify_image(s.image) is not None:
            skipped.corrupt.append(s.id)
            continue
        samples.append(s)
    if not seen_any:
        raise DatasetError(located(p, None, f"dataset for {adapter!r} is empty (no JSON lines)",
                                   fix="add samples, one JSON object per line"))
    if not samples:
        raise DatasetError(located(p, None, f"no usable sample for {adapter!r}: {skipped.summary()}",
                                   fix="check the `image` paths (relative to the JSONL's folder)"))
    return samples, skipped


def read_routing_split(path: str | Path) -> list[Sample]:
    """Read ``train.jsonl`` / ``val.jsonl`` / ``eval.jsonl`` of a routing dataset (labels required)."""
    p = Path(path)
    out: list[Sample] = []
    for line_no, record in _iter_records(p):
        s = _parse(record, p, line_no, adapter=None)
        label = record.get("label")
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise DatasetError(located(p, "label", "missing or not a non-negative integer", line=line_no,
                                       fix="rebuild the routing dataset with `router build-dataset`"))
        s.label = label
        if not s.adapter:
            raise DatasetError(located(p, "adapter", "missing adapter name", line=line_no,
                                       fix="rebuild the routing dataset with `router build-dataset`"))
        out.append(s)
    return out


# ---- the routing dataset ---------------------------------------------------------------

@dataclass
class RoutingDataset:
    """A routing dataset folder, read back: metadata + splits."""

    dir: Path
    metadata: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    def has_split(self, split: str) -> bool:
        return (self.dir / f"{split}.jsonl").is_file()

    def split(self, split: str) -> list[Sample]:
        p = self.dir / f"{split}.jsonl"
        if not p.is_file():
            have = [s for s in SPLITS if self.has_split(s)]
            raise DatasetError(located(p, None, f"routing dataset has no {split!r} split (has: {', '.join(have)})",
                                       fix="build one with --eval-samples N" if split == "eval" else
                                       "rebuild it with `router build-dataset`"))
        samples = read_routing_split(p)
        n = len(self.class_names)
        for s in samples:
            if s.label >= n or self.class_names[s.label] != s.adapter:
                raise DatasetError(located(s.source, "label", f"label {s.label} / adapter {s.adapter!r} disagrees "
                                           f"with metadata.json class_names {self.class_names}",
                                           fix="rebuild the routing dataset with `router build-dataset`"))
        return samples

    def fingerprint(self) -> str:
        """sha256 over train.jsonl + val.jsonl bytes: identifies what a head was trained on."""
        h = hashlib.sha256()
        for split in ("train", "val"):
            p = self.dir / f"{split}.jsonl"
            h.update(f"{split}\n".encode())
            if p.is_file():
                h.update(p.read_bytes())
        return h.hexdigest()[:16]


def load_routing_dataset(path: str | Path) -> RoutingDataset:
    d = Path(path)
    mp = d / METADATA_FILE
    if not d.is_dir():
        raise DatasetError(located(d, None, "routing dataset folder not found",
                                   fix="build one with `router build-dataset`"))
    if not mp.is_file():
        raise DatasetError(located(mp, None, "not a routing dataset (no metadata.json)",
                                   fix="build one with `router build-dataset`"))
    try:
        meta = json.loads(mp.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(located(mp, getattr(e, "lineno", None), f"not valid JSON: {e}",
                                   fix="rebuild it with `router build-dataset`")) from None
    names = meta.get("class_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) < 2:
        raise DatasetError(located(mp, "class_names", "missing, or fewer than two names",
                                   fix="rebuild it with `router build-dataset`"))
    return RoutingDataset(dir=d, metadata=meta)


def newest_routing_dataset(root: str | Path) -> Path:
    """The most recently built ``routing_*`` folder under ``root`` (by metadata created_at, then name)."""
    r = Path(root)
    found = []
    if r.is_dir():
        for d in r.iterdir():
            mp = d / METADATA_FILE
            if d.name.startswith(ROUTING_PREFIX) and mp.is_file():
                try:
                    created = json.loads(mp.read_text()).get("created_at", "")
                except Exception:
                    created = ""
                found.append((str(created), d.name, d))
    if not found:
        raise DatasetError(located(r, None, "no routing dataset found", fix="run `router build-dataset` first"))
    return max(found)[2]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _routing_record(s: Sample, label: int, out_dir: Path) -> dict[str, Any]:
    rec = dict(s.record)
    try:
        image = os.path.relpath(s.image, out_dir)
    except ValueError:  # another drive (Windows)
        image = s.image
    rec["image"] = image
    rec["label"] = label
    rec["adapter"] = s.adapter
    rec["source"] = s.source
    return rec


def _draw(samples: list[Sample], want: int, rng: random.Random, skipped: Skipped) -> list[Sample]:
    """Shuffle (seeded) and take ``want`` samples, verifying images as they are drawn."""
    order = list(samples)
    rng.shuffle(order)
    taken: list[Sample] = []
    for s in order:
        if len(taken) >= want:
            break
        if verify_image(s.image) is not None:
            skipped.corrupt.append(s.id)
            continue
        taken.append(s)
    return taken


def split_counts(n: int, val_fraction: float) -> tuple[int, int]:
    """``(n_train, n_val)`` for ``n`` samples of one class: at least one of each."""
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return n - n_val, n_val


def build_routing_dataset(registry: Registry, out_root: str | Path, *, train_samples: int | None = None,
                          eval_samples: int | None = 0, val_fraction: float = 0.2, seed: int = 0,
                          progress: Progress | None = None) -> Path:
    """Sample each adapter's dataset into a labelled routing dataset; return its folder.

    Per adapter (label = its position in ``registry.adapters``): a seeded shuffle, then
    ``train_samples`` for train+val (all when None) and ``eval_samples`` more held out
    in ``eval.jsonl``. Each adapter's draw is seeded by ``(seed, adapter name)``, so
    adding an adapter leaves the others' samples -- and their cached features --
    unchanged. The train/val split is stratified: ``val_fraction`` of every class
    (at least one) goes to val.
    """
    prog = progress_or_null(progress)
    names = registry.adapter_names
    if len(names) < 2:
        raise DatasetError(located(registry.path, "adapters",
                                   f"a router needs at least two adapters (registry has {len(names)}: "
                                   f"{', '.join(names) or 'none'}); every sample would get the same label",
                                   fix="`router add-adapter NAME` to register another"))
    eval_samples = eval_samples or 0
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    sources = []
    out_root = Path(out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".routing-", dir=out_root))
    try:
        with prog.task("reading adapter datasets", total=len(names)) as t:
            for label, entry in enumerate(registry.adapters):
                path = registry.resolve(entry.dataset)
                samples, skipped = read_adapter_dataset(path, adapter=entry.name, verify_images=False)
                rng = random.Random(f"vlrouter:{seed}:{entry.name}")
                if train_samples is None:  # all of it: the held-out eval samples first come off the end
                    drawn = _draw(samples, len(samples), rng, skipped)
                    n_eval = min(eval_samples, max(0, len(drawn) - 2))
                else:
                    drawn = _draw(samples, train_samples + eval_samples, rng, skipped)
                    n_eval = max(0, len(drawn) - train_samples)
                pool, held = drawn[:len(drawn) - n_eval], drawn[len(drawn) - n_eval:]
                if skipped:
                    prog.log(skipped.summary())
                if len(pool) < 2:
                    raise DatasetError(located(path, None, f"adapter {entry.name!r} has {len(pool)} usable "
                                               f"sample{'s' if len(pool) != 1 else ''}; a split needs at least 2 "
                                               "(one for train, one for val)"
                                               + (f"; {skipped.summary()}" if skipped else ""),
                                               fix="add samples to this dataset"))
                if train_samples is not None and len(pool) < train_samples:
                    prog.log(f"{entry.name}: only {len(pool)} usable samples for --train-samples {train_samples}")
                if eval_samples and len(held) < eval_samples:
                    prog.log(f"{entry.name}: only {len(held)} samples left for --eval-samples {eval_samples}")
                _, n_val = split_counts(len(pool), val_fraction)
                parts = {"val": pool[:n_val], "train": pool[n_val:], "eval": held}
                for split, items in parts.items():
                    # image paths relative to tmp, which sits beside the final folder
                    splits[split].extend(_routing_record(s, label, tmp) for s in items)
                    counts[split][entry.name] = len(items)
                sources.append({"adapter": entry.name, "label": label, "dataset": entry.dataset, "path": str(path),
                                "sha256": _sha256_file(path), "read": len(samples),
                                "skipped": skipped.as_dict()})
                t.advance()
        order = random.Random(f"vlrouter:{seed}:order")
        written = {}
        for split in SPLITS:
            if split == "eval" and not eval_samples:
                continue  # pragma: no mutate (eval is the last of SPLITS: break would do the same)
            recs = splits[split]
            order.shuffle(recs)
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
            (tmp / f"{split}.jsonl").write_text(lines, encoding="utf-8")
            written[split] = len(recs)
        now = datetime.now(timezone.utc)
        meta = {
            "format_version": DATASET_FORMAT_VERSION,
            "class_names": names,
            "num_classes": len(names),
            "counts": {s: counts[s] for s in written},
            "totals": written,
            "sources": sources,
            "seed": seed,
            "val_fraction": val_fraction,
            "train_samples": train_samples,
            "eval_samples": eval_samples,
            "registry": str(registry.path),
            "registry_fingerprint": registry.fingerprint(),
            "label_fingerprint": registry.label_fingerprint(),
            "created_at": now.isoformat(timespec="microseconds"),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)
        final = _move_to_free_name(tmp, out_root, ROUTING_PREFIX + time.strftime("%Y%m%d_%H%M%S"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prog.log(f"routing dataset {final}: " + ", ".join(f"{s} {n}" for s, n in written.items()))
    return final


def _move_to_free_name(src: Path, root: Path, base: str) -> Path:
    """Rename ``src`` to ``root/base``, or ``base_2``, ``base_3``… when taken (also by a racing build)."""
    i = 1
    while True:
        cand = root / (base if i == 1 else f"{base}_{i}")
        if not cand.exists():
            try:
                os.rename(src, cand)  # fails if a racing build created it meanwhile
                return cand
            except OSError:
                if not cand.exists():
                    raise
        i += 1
