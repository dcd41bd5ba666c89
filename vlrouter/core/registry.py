"""registry.yaml: strict pydantic models, loading with located errors, atomic round-trip saves.

People write this file, so unknown keys are errors (``extra="forbid"``), and every
error names the file, the line (YAML syntax) or the field path with its line, and a fix.
Edits go through :class:`Registry` methods that keep the user's comments and key order
(ruamel.yaml round-trip) and are written with temp file + ``os.replace``: the file is
either the old bytes or the new bytes, never half.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError

from vlrouter.core.atomic import atomic_write_bytes  # noqa: F401  (re-exported: callers use registry.atomic_write_bytes)
from vlrouter.core.errors import RegistryError, located
from vlrouter.core.paths import check_regular_file, looks_like_local_path
from vlrouter.core.sections import SECTION_FIXES, EngineSection, ServeSection
from vlrouter.core.sections import Strict as _Strict
from vlrouter.core.views import VIEWS
from vlrouter.core.yamldoc import (
    check_expansion,
    copy_doc,
    dump_yaml,
    line_of,
    move_trailing_comment,
    one_line,
    plain,
    yaml_rt,
)

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
DEFAULT_REGISTRY = "registry.yaml"
# Words with another meaning where adapter names appear: router.fallback / Action.adapter ("base",
# "error") and the server's model field ("auto").
RESERVED_NAMES = {"base": "the base model (router.fallback: base, Action.adapter)",
                  "error": "router.fallback: error", "auto": "the server's `model: auto`"}
PEFT_PREFIX = "lora_"  # peft re-initialises an adapter whose name is part of its parameter prefix
MAX_REGISTRY_BYTES = 1 << 20  # registry.yaml is a page of settings, not data
MAX_SEED = 2**63 - 1


def adapter_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an adapter name (a router label and a peft adapter name), or None."""
    if not NAME_RE.match(name):
        return f"adapter name {name!r} must match [a-z0-9][a-z0-9-]* (lowercase letters, digits, dashes)"
    if len(name) > 64:
        return f"adapter name {name!r} is longer than 64 characters"
    if name in RESERVED_NAMES:
        return f"adapter name {name!r} is reserved: it means {RESERVED_NAMES[name]}"
    if name in PEFT_PREFIX:
        return (f"adapter name {name!r} is part of peft's parameter prefix {PEFT_PREFIX!r}, which makes peft "
                "re-initialise its weights")
    return None


class RouterSection(_Strict):
    dir: str = "runs/router"
    pooling: str | list[str] = "auto"  # auto, one view, or a list of views concatenated in that order
    layer: Literal["auto"] | Annotated[int, Field(ge=-10_000, le=10_000)] = "auto"  # auto, or a hidden-state index
    ood: Literal["auto", "off"] = "auto"  # auto: flag inputs unlike any adapter's data (Route.known)
    min_confidence: float = Field(0.0, ge=0.0, le=1.0)
    fallback: str = "base"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_prompt_tokens: int = Field(4096, ge=1, le=1_000_000)

    @field_validator("layer", mode="before")
    @classmethod
    def _layer(cls, v: Any) -> Any:
        """One message for a bad layer (the union would report one per alternative)."""
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and -10_000 <= v <= 10_000):
            return v
        raise ValueError(f"layer must be auto or a hidden-state index (an integer, -1 = the last layer), got {v!r}")

    @field_validator("pooling")
    @classmethod
    def _views(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else list(v)
        if isinstance(v, str) and v == "auto":
            return v
        if not names:
            raise ValueError(f"the view list is empty; name at least one of {', '.join(VIEWS)}, or write auto")
        bad = [n for n in names if n not in VIEWS]
        if bad:
            raise ValueError(f"unknown view {bad[0]!r}; views are {', '.join(VIEWS)} (one, or a list), "
                             "or auto (never token 0)")
        if len(set(names)) != len(names):
            raise ValueError(f"view {next(n for n in names if names.count(n) > 1)!r} is listed twice")
        return v

    @property
    def views(self) -> list[str] | None:
        """The explicit views, or None for auto."""
        p = self.pooling
        return None if p == "auto" else ([p] if isinstance(p, str) else list(p))


class TrainSection(_Strict):
    backend: str = "local"
    epochs: int = Field(100, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=1_000_000)
    lr: float = Field(1.0e-4, gt=0)
    patience: int = Field(5, ge=1, le=1_000_000)
    eval_every: int = Field(20, ge=1, le=1_000_000)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0, le=MAX_SEED)
    head: Literal["linear", "mlp"] = "linear"
    head_hidden: int = Field(512, ge=1, le=65_536)
    solver: Literal["auto", "lbfgs", "adamw"] = "auto"  # auto: lbfgs, unless minibatch settings are given
    l2: Literal["auto"] | float = "auto"  # L2 strength of the lbfgs head; auto: chosen by cross-validation
    cv_folds: int = Field(5, ge=2, le=100)
    train_samples: int | None = Field(None, ge=1, le=1_000_000_000)
    eval_samples: int | None = Field(None, ge=0, le=1_000_000_000)
    workers: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"  # "auto": chosen from the CPU count
    embed_batch_size: int = Field(8, ge=1, le=65_536)

    @field_validator("l2")
    @classmethod
    def _l2(cls, v: str | float) -> str | float:
        if v != "auto" and not (isinstance(v, (int, float)) and 0 < v < float("inf")):
            raise ValueError(f"l2 must be auto or a positive finite number, got {v!r}")
        return v
    datasets_dir: str = "datasets"
    cache_dir: str = ".features"


class ModalSection(_Strict):
    app_name: str = "vlrouter"
    data_volume: str = "moe-lora-data"
    output_volume: str = "routing-output"
    checkpoints_volume: str = "moe-lora-checkpoints"
    gpu: str = "H100"
    cpu_shards: int = Field(8, ge=1, le=10_000)


class AdapterEntry(_Strict):
    name: str
    plugin: str | None = None
    dataset: str
    checkpoint: str
    description: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        problem = adapter_name_problem(v)
        if problem:
            raise ValueError(problem)
        return v


class RegistryModel(_Strict):
    base_model: str
    base_model_revision: str | None = None
    router: RouterSection = Field(default_factory=RouterSection)
    train: TrainSection = Field(default_factory=TrainSection)
    modal: ModalSection = Field(default_factory=ModalSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    adapters: list[AdapterEntry] = Field(default_factory=list)

    @field_validator("adapters", mode="before")
    @classmethod
    def _empty_adapters(cls, v: Any) -> Any:
        return [] if v is None else v  # `adapters:` with nothing under it is an empty list

    @model_validator(mode="after")
    def _cross(self) -> RegistryModel:
        seen: dict[str, int] = {}
        for i, a in enumerate(self.adapters):
            if a.name in seen:
                raise ValueError(f"adapters[{i}].name: duplicate adapter name {a.name!r} "
                                 f"(also adapters[{seen[a.name]}])")
            seen[a.name] = i
        fb = self.router.fallback
        if fb not in ("base", "error") and fb not in seen:
            raise ValueError(
                f"router.fallback: {fb!r} is not 'base', 'error' or an adapter in this registry "
                f"(adapters: {', '.join(seen) or 'none'})"
            )
        return self


def _loc_str(loc: tuple) -> str:
    out = ""
    for k in loc:
        out += f"[{k}]" if isinstance(k, int) else (f".{k}" if out else str(k))
    return out


def _fix_for(err: dict, loc: tuple) -> str:
    etype = err.get("type", "")
    if etype == "extra_forbidden":
        key = loc[-1] if loc else "?"
        parent = RegistryModel
        for k in loc[:-1]:
            if isinstance(k, int):
                continue
            f = parent.model_fields.get(k)
            ann = getattr(f, "annotation", None) if f else None
            inner = getattr(ann, "__args__", (ann,))[0] if ann is not None else None
            parent = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else (
                ann if isinstance(ann, type) and issubclass(ann, BaseModel) else parent)
        known = list(parent.model_fields)
        close = difflib.get_close_matches(str(key), known, n=1)
        return f"remove it{f' or rename it to {close[0]!r}' if close else ''}; known keys: {', '.join(known)}"
    if etype == "missing":
        return f"add `{loc[-1]}:`"
    if etype == "literal_error":
        return "use one of the allowed values"
    if etype == "value_error" and "duplicate" in str(err.get("msg", "")):
        return "rename or remove one of the two entries"
    if loc[-1:] == ("pooling",) or loc[-2:-1] == ("pooling",):
        return f"write auto, one of {', '.join(VIEWS)}, or a list of them"
    if "layer" in loc:
        return "write auto, or a layer number (1 = the first decoder layer; -1 = the last)"
    if loc and loc[-1] == "fallback":
        return "use base, error, or the name of an adapter listed under adapters:"
    return SECTION_FIXES.get(tuple(loc[-2:]), "correct the value")


class Registry:
    """A loaded registry.yaml: validated model + the round-trip document for edits."""

    def __init__(self, path: Path, model: RegistryModel, doc: CommentedMap, raw: bytes | None = None,
                 origin: bytes | None = None):
        self.path = path
        self.model = model
        self._doc = doc
        self._raw = raw
        # The file's bytes when it was read: an edit is saved only if the file still holds them.
        self._origin = raw if origin is None else origin

    # ---- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path = DEFAULT_REGISTRY) -> Registry:
        """Read and validate registry.yaml. ``path`` may name the folder holding it."""
        p = Path(path)
        if p.is_dir():
            if not (p / DEFAULT_REGISTRY).is_file():
                raise RegistryError(located(p, None, f"is a folder without a {DEFAULT_REGISTRY}",
                                            fix=f"pass the registry file itself, e.g. {p / DEFAULT_REGISTRY}"))
            p = p / DEFAULT_REGISTRY
        if not p.exists():
            raise RegistryError(located(p, None, "registry file not found",
                                        fix="create one (see README 'registry.yaml reference') or pass --registry"))
        check_regular_file(p, what="registry", error=RegistryError, fix="pass a registry.yaml file")
        try:
            size = p.stat().st_size
            if size > MAX_REGISTRY_BYTES:
                raise RegistryError(located(p, None, f"{size:,} bytes is far too large for a registry "
                                            f"(limit {MAX_REGISTRY_BYTES:,})", fix="point --registry at registry.yaml"))
            raw = p.read_bytes()
        except OSError as e:
            raise RegistryError(located(p, None, f"cannot read: {e.strerror}", fix="check permissions")) from None
        return cls.from_bytes(raw, p)

    @classmethod
    def from_bytes(cls, raw: bytes, path: str | Path = DEFAULT_REGISTRY) -> Registry:
        p = Path(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RegistryError(located(p, None, f"not UTF-8 text (byte {e.start})", fix="save it as UTF-8")) from None
        if not text.strip():
            raise RegistryError(located(p, None, "file is empty",
                                        fix="add at least `base_model:` and `adapters:` (see README)"))
        try:
            doc = yaml_rt().load(text)
        except MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else None
            raise RegistryError(located(p, line, f"YAML syntax error: {one_line(e.problem or e.context)}",
                                        fix="fix the indentation/quoting on that line")) from None
        except ReaderError as e:  # a control character (NUL, …) that YAML forbids
            line = text.count("\n", 0, e.position) + 1 if isinstance(e.position, int) else None
            what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
            raise RegistryError(located(p, line, f"YAML error: unacceptable character {what} ({e.reason})",
                                        fix="remove the control character from that line")) from None
        except YAMLError as e:
            raise RegistryError(located(p, None, f"YAML error: {one_line(e)}", fix="fix the YAML")) from None
        except Exception as e:  # ruamel raises a few non-YAMLError types on odd input
            raise RegistryError(located(p, None, f"YAML error: {type(e).__name__}: {one_line(e)}",
                                        fix="fix the YAML")) from None
        if doc is None:
            raise RegistryError(located(p, None, "file holds no YAML document",
                                        fix="add at least `base_model:` and `adapters:`"))
        if not isinstance(doc, dict):
            kind = "a list" if isinstance(doc, list) else f"a {type(doc).__name__}"
            raise RegistryError(located(p, 1, f"top level is {kind}, not a mapping",
                                        fix="start the file with `base_model: ...` keys, not `- ...` or a bare value"))
        check_expansion(doc, p)
        model = cls._validate(doc, p)
        return cls(p, model, doc, raw)

    @staticmethod
    def _validate(doc: Any, p: Path) -> RegistryModel:
        try:
            return RegistryModel.model_validate(plain(doc))
        except ValidationError as e:
            errs = e.errors()
            # An unknown key usually explains the "missing" error beside it (a typo): report it first.
            err = next((x for x in errs if x["type"] == "extra_forbidden"), errs[0])
            loc = tuple(err["loc"])
            msg = err["msg"]
            if err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
                m = re.match(r"^([\w\[\]\.]+): (.*)$", msg)
                if m:  # cross-field errors carry their own field path
                    field, msg = m.group(1), m.group(2)
                    loc = tuple(int(x) if x.isdigit() else x for x in re.findall(r"[A-Za-z_]\w*|\d+", field))
            where = _loc_str(loc) or "(top level)"
            line = line_of(doc, loc)
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {loc[-1]!r}"
            more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
            raise RegistryError(located(p, where, msg + more, line=line, fix=_fix_for(err, loc))) from None

    # ---- queries ----------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The registry's folder, absolute: paths in registry.yaml mean the same from any working directory."""
        return Path(os.path.abspath(self.path.parent))

    def resolve(self, value: str | Path) -> Path:
        """A path from the registry, relative to the registry file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.root / p)

    @property
    def adapters(self) -> list[AdapterEntry]:
        return list(self.model.adapters)

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.model.adapters]

    def adapter(self, name: str) -> AdapterEntry:
        for a in self.model.adapters:
            if a.name == name:
                return a
        raise RegistryError(located(self.path, "adapters", f"no adapter named {name!r}"
                                    + suggest(name, self.adapter_names), fix="`router status` lists them"))

    def index_of(self, name: str) -> int:
        return self.adapter_names.index(self.adapter(name).name)

    @property
    def router_dir(self) -> Path:
        return self.resolve(self.model.router.dir)

    @property
    def base_model(self) -> str:
        """The base model to load: a hub id as written, or a local folder as an absolute path.

        A value is a local folder when it exists (relative to the registry's folder), when
        it can only be a path (``./m``, ``/m``, ``a/b/c``, …), or when its first part is a
        folder beside the registry (``models/tiny`` with ``models/`` present) -- so a
        missing local folder is reported as missing, never looked up on the Hub.
        """
        bm = self.model.base_model
        local = self.resolve(bm)
        if local.exists() or self.base_model_is_local():
            return str(local)
        return bm

    def base_model_is_local(self) -> bool:
        """Whether ``base_model`` names a local folder (present or not) rather than a hub id."""
        bm = self.model.base_model
        if looks_like_local_path(bm) or self.resolve(bm).exists():
            return True
        first = bm.split("/")[0]
        return "/" in bm and first not in ("", ".", "..") and (self.root / first).is_dir()

    def check_base_model(self) -> None:
        """Refuse a local ``base_model`` folder that does not exist (before any loader treats it as a hub id)."""
        if not self.base_model_is_local():
            return
        local = Path(self.base_model)
        if not local.is_dir():
            state = "is not a folder" if local.exists() else "not found"
            raise self._err(("base_model",), f"local base model folder {state}: {local}",
                            fix="build it (`router tiny-model DIR`) or download the model there, or correct "
                                "base_model in registry.yaml (relative paths resolve against its folder)")

    def label_fingerprint(self) -> str:
        """Fingerprint of the ordered label set (names in registry order)."""
        return fingerprint_labels(self.adapter_names)

    def fingerprint(self) -> str:
        """Fingerprint of what a router is trained from: labels, datasets, base model, pooling, layer."""
        m = self.model
        blob = json.dumps({
            "labels": self.adapter_names,
            "datasets": [a.dataset for a in m.adapters],
            "base_model": m.base_model,
            "pooling": m.router.pooling,
            "layer": m.router.layer,
        }, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def check_paths(self, names: list[str] | None = None, *, checkpoints: bool = False) -> None:
        """Raise for the first adapter whose dataset (and, if asked, checkpoint) is missing."""
        for i, a in enumerate(self.model.adapters):
            if names is not None and a.name not in names:
                continue
            ds = self.resolve(a.dataset)
            if not ds.is_file():
                raise self._err(("adapters", i, "dataset"), f"dataset for {a.name!r} not found: {ds}",
                            fix="create it or pass --dataset PATH")
            if checkpoints:
                ck = self.resolve(a.checkpoint)
                if not (ck / "adapter_config.json").is_file():
                    raise self._err(("adapters", i, "checkpoint"),
                                    f"checkpoint for {a.name!r} is not a PEFT adapter folder: {ck}",
                            fix="point at a folder with adapter_config.json")

    def line_of(self, loc: tuple) -> int | None:
        """1-based line in registry.yaml of the field at ``loc`` (e.g. ``("adapters", 1, "checkpoint")``)."""
        return line_of(self._doc, loc)

    def _err(self, loc: tuple, problem: str, fix: str) -> RegistryError:
        """A RegistryError located at field ``loc`` (with its line when known)."""
        return RegistryError(located(self.path, _loc_str(loc), problem, line=line_of(self._doc, loc), fix=fix))

    # ---- edits (validated before anything is written) ----------------------------------
    def add_adapter(self, entry: AdapterEntry) -> Registry:
        """A new Registry with ``entry`` appended (label = its position). Nothing is written."""
        if entry.name in self.adapter_names:
            raise self._err(("adapters", self.index_of(entry.name), "name"),
                            f"adapter {entry.name!r} is already registered "
                                        f"(label {self.index_of(entry.name)})",
                            fix=f"`router remove-adapter {entry.name}` first, or choose another name")
        doc = copy_doc(self._doc)
        item = CommentedMap()
        item["name"] = entry.name
        if entry.plugin:
            item["plugin"] = entry.plugin
        item["dataset"] = entry.dataset
        item["checkpoint"] = entry.checkpoint
        if entry.description:
            item["description"] = entry.description
        if "adapters" not in doc or doc["adapters"] is None:
            doc["adapters"] = CommentedSeq()
        seq = doc["adapters"]
        if len(seq):
            # Comment lines after the last entry (a file's closing comment, or the one heading
            # the next section) belong after the new entry, not above it.
            move_trailing_comment(seq[-1], item)
        seq.append(item)
        return self._from_doc(doc)

    def remove_adapter(self, name: str) -> Registry:
        idx = self.index_of(name)
        doc = copy_doc(self._doc)
        seq = doc["adapters"]
        if idx == len(seq) - 1 and idx > 0:
            move_trailing_comment(seq[idx], seq[idx - 1])  # keep the comments that followed it
        del seq[idx]
        if self.model.router.fallback == name:
            raise self._err(("router", "fallback"), f"router.fallback names {name!r}",
                            fix="set router.fallback to base, error or another adapter first")
        return self._from_doc(doc)

    def _from_doc(self, doc: CommentedMap) -> Registry:
        text = dump_yaml(doc)
        new_doc = yaml_rt().load(text)
        model = self._validate(new_doc, self.path)
        return Registry(self.path, model, new_doc, text.encode(), origin=self._origin)

    def to_text(self) -> str:
        return dump_yaml(self._doc)

    def save(self, path: str | Path | None = None) -> Path:
        """Atomic write (temp file in the same folder, fsync, rename)."""
        target = Path(path) if path is not None else self.path
        atomic_write_bytes(target, self.to_text().encode("utf-8"))
        return target

    def save_if_unchanged(self, *, retrained: bool = False) -> Path:
        """:meth:`save`, refused when the file on disk no longer holds the bytes this registry was read from.

        ``retrained``: the router was already retrained for this edit (the message says so).
        """
        try:
            now = self.path.read_bytes()
        except OSError:
            now = None
        if self._origin is not None and now != self._origin:
            after = (f"; the router retrained for {', '.join(self.adapter_names)} is already live, so it is stale "
                     "against the file until you run the command again") if retrained else ""
            raise RegistryError(located(self.path, None, f"the file changed on disk while this command ran; not "
                                        f"overwriting it{after}", fix="run the command again"))
        return self.save()

    def relative_path(self, value: str) -> str:
        """A path typed on the command line (relative to the cwd) as registry.yaml stores it.

        registry.yaml's relative paths resolve against the registry's folder, so a relative
        path is rewritten relative to that folder (unchanged when the registry sits in the
        current directory). Absolute paths stay absolute.
        """
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        absolute = Path(os.path.abspath(p))
        root = Path(os.path.abspath(self.root))
        try:
            return absolute.relative_to(root).as_posix()
        except ValueError:
            return os.path.relpath(absolute, root)


def fingerprint_labels(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def suggest(name: str, candidates: list[str]) -> str:
    """``"; did you mean 'x'?"`` or ``""``: for errors about unknown names."""
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def new_registry_text(base_model: str, adapters: list[AdapterEntry], **router_train: Any) -> str:
    """A commented starter registry.yaml (used by the demo and docs)."""
    lines = [
        "# vlrouter registry: the adapters the router chooses between (label = position).",
        f"base_model: {base_model}",
        "router:",
        "  dir: runs/router          # head.safetensors + router.json",
        "  pooling: auto             # auto | a view | a list of views (never token 0)",
        "  layer: auto               # auto | a layer number (-1 = the last)",
        "  ood: auto                 # auto | off: flag inputs unlike any adapter's data",
        "  min_confidence: 0.0",
        "  fallback: base            # base | error | <adapter name>",
        "train:",
        "  backend: local            # local | modal",
    ]
    for k, v in router_train.items():
        lines.append(f"  {k}: {v}")
    lines.append("adapters:")
    for a in adapters:
        lines.append(f"  - name: {a.name}")
        if a.plugin:
            lines.append(f"    plugin: {a.plugin}")
        lines.append(f"    dataset: {a.dataset}")
        lines.append(f"    checkpoint: {a.checkpoint}")
    if not adapters:
        lines[-1] = "adapters: []"
    return "\n".join(lines) + "\n"
