"""The on-disk recording of a reference run: a folder that a kill at any instant leaves readable.

Layout::

    manifest.json                      what the run was, which steps are complete, sha256 and size of every file,
                                       and the sha256 of its own content ("manifest_sha256")
    pool.safetensors                   the pool: sample ids of every batch, and the batch trained at each step
    initial_state.safetensors          the module's state_dict before the first step
    rng_state.safetensors              the RNG states of every epoch's first step and of every step something
                                       between steps drew from them (validation): "<t>/torch", "<t>/cuda"
    probes/t000012_r0.safetensors      what rank 0 probed at step 12 ("pool.<name>" stacked over its pool batches,
                                       "pool_positions", and on rank 0 "val.<name>")
    sensitivity.safetensors            optional, added to a complete recording by ``lpl.order.record_sensitivities``

Every file is written to a temporary name, fsynced and renamed (``lpl.utils.io``); the manifest is rewritten last,
so it only ever names complete files, and files it does not name (from a step cut short) are ignored and later
overwritten. The manifest's own checksum covers what the other files' checksums cannot: a changed learning rate or
sample id in the manifest itself. Readers memory-map shards with ``safetensors.safe_open`` and load one step (or one
tensor) at a time.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Mapping, Sequence

import torch
from safetensors import safe_open

from lpl.utils.errors import LplError
from lpl.utils.io import atomic_write_bytes, atomic_write_json, safetensors_bytes

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "manifest_sha256"  # the manifest's checksum of its other fields (canonical JSON)
POOL_FILE = "pool.safetensors"
INITIAL_STATE_FILE = "initial_state.safetensors"
RNG_STATE_FILE = "rng_state.safetensors"
PROBE_DIR = "probes"
SENSITIVITY_FILE = "sensitivity.safetensors"
LOCK_FILE = ".lock"  # held by the one process writing the recording
FILE_ENTRIES = ("pool", "initial_state", "rng_state", "sensitivity")  # manifest entries that name one file each
STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
POOL_PREFIX, VAL_PREFIX = "pool.", "val."
# fields that must agree for a resumed run to continue an existing recording
IDENTITY_FIELDS = ("model.param_hash", "model.num_params", "model.class_path", "model.hparams",
                   "datamodule.class_path", "datamodule.hparams", "projection.seed", "projection.proj_dim",
                   "projection.kind", "store_dtype", "precision", "num_steps", "pool.sha256", "probe_every_n_steps",
                   "curvature_rank", "optimizer.name", "optimizer.eps", "optimizer.decoupled")


class RecordingError(LplError):
    """A recording folder that is missing, does not match the run, or holds a truncated or corrupted file."""


def parameter_signature(named_shapes: Iterable[tuple[str, Sequence[int]]]) -> dict[str, Any]:
    """Parameter count and a sha256 of the parameter names and shapes: identifies a model architecture."""
    entries = [[name, [int(s) for s in shape]] for name, shape in named_shapes]
    num_params = 0
    for _, shape in entries:
        count = 1
        for s in shape:
            count *= s
        num_params += count
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return {"num_params": num_params, "param_hash": digest}


def _write_file(root: Path, relative: str, data: bytes) -> dict[str, Any]:
    atomic_write_bytes(root / relative, data)
    return {"file": relative, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _replace_named_file(root: Path, current: Mapping[str, Any] | None, name: str, data: bytes,
                        publish: Callable[[dict[str, Any]], None]) -> None:
    """Write ``data`` for a manifest entry that may name a file already, so that a kill at any instant leaves a
    readable recording: a replacement goes under a name carrying its digest (never over the file the manifest on
    disk names), ``publish(entry)`` then writes the manifest naming it, and only then the old file is removed. A
    kill between the steps leaves at worst an unreferenced file."""
    relative = name
    if current:
        stem, dot, suffix = name.partition(".")
        relative = f"{stem}.{hashlib.sha256(data).hexdigest()[:16]}{dot}{suffix}"
    publish(_write_file(root, relative, data))
    old = (current or {}).get("file")
    if old and old != relative:
        _remove_replaced(root, old)


def _remove_replaced(root: Path, name: str) -> None:
    """Delete a file a manifest no longer names: only a bare name in the folder (an edited manifest could say
    anything)."""
    if Path(name).name == name and name not in ("", ".", ".."):
        (root / name).unlink(missing_ok=True)


def _lock_for_writing(root: Path) -> IO[str] | None:
    """An exclusive lock on a recording folder for one writer (POSIX ``flock``: the OS drops it when the process
    dies, so a killed run resumes freely); None where the platform has no ``fcntl``."""
    try:
        import fcntl
    except ImportError:
        return None
    handle = open(root / LOCK_FILE, "a", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        handle.close()
        if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            warnings.warn(f"{root}: this file system does not lock files ({error}); nothing stops two runs from "
                          "recording to it at once, so give each run its own dirpath.", stacklevel=3)
            return None
        raise RecordingError(f"{root} is being written by another writer right now (a second run recording to the "
                             "same dirpath, or an earlier writer in this process that was neither finished nor "
                             "released); give each run its own dirpath.") from None
    return handle


def _as_json(value: Any) -> Any:
    """``value`` as the manifest holds it after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def _field(manifest: Mapping[str, Any], dotted: str) -> Any:
    value: Any = manifest
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def _manifest_digest(content: Mapping[str, Any]) -> str:
    """sha256 of a manifest's content as canonical JSON (sorted keys, no whitespace): what the file says, not how it
    is laid out."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest atomically with the sha256 of its content, so that an edit or a flipped byte that leaves it
    valid JSON (a learning rate, a batch id) is refused when it is read."""
    # canonical JSON is the same for these values and for what json reads back from them (tuples become lists)
    content = {k: v for k, v in manifest.items() if k != MANIFEST_SHA256}
    atomic_write_json(root / MANIFEST, {**content, MANIFEST_SHA256: _manifest_digest(content)})


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of the recording folder ``root`` (without its checksum field), its structure and checksum
    checked; a missing, unreadable or damaged manifest is a ``RecordingError``."""
    manifest_path = root / MANIFEST
    if manifest_path.exists() and not manifest_path.is_file():
        raise RecordingError(f"{manifest_path} is not a file (a folder?), so {root} holds no readable recording; "
                             "remove it, or pass the recorder's dirpath.")
    if not manifest_path.is_file():
        raise RecordingError(f"{root} holds no recording ({MANIFEST} is missing); pass the recorder's dirpath.")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise RecordingError(f"{manifest_path} is unreadable ({error}); the recording cannot be used.") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != SCHEMA_VERSION:
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise RecordingError(
            f"{manifest_path} has schema version {version}, "
            f"this lpl reads version {SCHEMA_VERSION}; record again with this version."
        )
    stored = manifest.pop(MANIFEST_SHA256, None)
    _check_manifest(manifest_path, manifest)  # first: a bad field is named, not just "changed"
    if stored is None:  # one place in lpl warns: Python shows it once per recording and process
        warnings.warn(f"{manifest_path} has no {MANIFEST_SHA256} (an older lpl wrote it), so edits to it cannot be "
                      "detected.", stacklevel=2)
    elif stored != _manifest_digest(manifest):
        raise RecordingError(f"{manifest_path} is damaged or was edited: its content does not match its "
                             f"{MANIFEST_SHA256} (an lpl from before that checksum, resuming the run, would also leave "
                             "it stale); record the run again.")
    return manifest


def pool_tensors(batches: Sequence[Sequence[int]], order: Sequence[int]) -> dict[str, torch.Tensor]:
    """The pool as flat tensors: ``batch_ids`` (all ids), ``batch_offsets`` [P + 1], ``order`` [T]."""
    lengths = torch.tensor([len(b) for b in batches], dtype=torch.int64)
    offsets = torch.zeros(len(batches) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(lengths, 0)
    ids = torch.tensor([int(i) for b in batches for i in b], dtype=torch.int64)
    return {"batch_ids": ids, "batch_offsets": offsets, "order": torch.tensor(list(order), dtype=torch.int64)}


_KINDS: dict[str, Callable[[Any], bool]] = {
    "an integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "a number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "a list": lambda v: isinstance(v, list),
    "numbers": lambda v: isinstance(v, list) and all(_KINDS["a number"](x) for x in v),
    "an object": lambda v: isinstance(v, dict),
}


_STEP_RANGES = (
    ("lr", "[0, inf)", lambda v: 0 <= v < float("inf")),
    ("beta1", "[0, 1)", lambda v: 0 <= v < 1),
    ("beta2", "[0, 1)", lambda v: 0 <= v < 1),
    ("eps", "(0, inf)", lambda v: 0 < v < float("inf")),
    ("weight_decay", "[0, inf)", lambda v: 0 <= v < float("inf")),
)


def _check_manifest(path: Path, manifest: Mapping[str, Any]) -> None:
    """Check the structure and types of every manifest field a reader uses, as the recorder writes them (in progress,
    stopped early, resumed or complete, with or without sensitivity data), so that a hand-edited or damaged manifest
    fails here, naming its bad field, instead of with a TypeError or KeyError deep inside a reader."""
    fields = _ManifestFields(path)
    status, num_steps = fields.check_header(manifest)
    fields.check_optimizer(fields.take(manifest, "optimizer", "", "an object", required=False) or {})
    fields.check_steps(fields.take(manifest, "steps", "", "a list"), status, num_steps)
    fields.check_probes(fields.take(manifest, "probes", "", "a list"), num_steps)


class _ManifestFields:
    """Typed reads of manifest fields that fail as ``RecordingError`` naming the bad field (for ``_check_manifest``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def bad(self, field: str, problem: str) -> RecordingError:
        return RecordingError(f"{self.path} is damaged or was edited: {field} {problem}; record the run again.")

    def take(self, entry: Mapping[str, Any], key: str, where: str, kind: str, required: bool = True) -> Any:
        field = f"{where}.{key}" if where else key
        if key not in entry:
            if required:
                raise self.bad(field, "is missing")
            return None
        value = entry[key]
        if not _KINDS[kind](value):
            raise self.bad(field, f"is {value!r:.60}, not {kind}")
        return value

    def file_entry(self, entry: Any, where: str) -> None:
        if not isinstance(entry, dict):
            raise self.bad(where, f"is {entry!r:.60}, not an object")
        self.take(entry, "file", where, "a string")
        self.take(entry, "sha256", where, "a string")
        if self.take(entry, "bytes", where, "an integer") < 0:
            raise self.bad(f"{where}.bytes", "is negative")

    def check_header(self, manifest: Mapping[str, Any]) -> tuple[str, int]:
        """Status, length, dtype, projection and the file entries; returns (status, num_steps)."""
        take = self.take
        status = take(manifest, "status", "", "a string")
        if status not in ("recording", "complete"):
            raise self.bad("status", f"is {status!r}, not 'recording' or 'complete'")
        num_steps = take(manifest, "num_steps", "", "an integer")
        if num_steps < 0:
            raise self.bad("num_steps", "is negative")
        if take(manifest, "store_dtype", "", "a string") not in STORE_DTYPES:
            raise self.bad("store_dtype", f"is {manifest['store_dtype']!r}, not one of {sorted(STORE_DTYPES)}")
        take(take(manifest, "projection", "", "an object"), "proj_dim", "projection", "an integer")
        per_epoch = take(manifest, "batches_per_epoch", "", "an integer", required=False)  # older recordings: absent
        if per_epoch is not None and per_epoch < 1:
            raise self.bad("batches_per_epoch", f"is {per_epoch}, not a positive number of batches")
        frozen = take(manifest.get("model") or {}, "frozen", "model", "a list", required=False)
        if frozen is not None and not all(isinstance(name, str) for name in frozen):
            raise self.bad("model.frozen", "holds a value that is not a parameter name")
        self.file_entry(take(manifest, "pool", "", "an object"), "pool")
        take(manifest["pool"], "num_batches", "pool", "an integer")
        self.file_entry(take(manifest, "initial_state", "", "an object"), "initial_state")
        for name in ("rng_state", "sensitivity"):  # optional: older recordings and those without sensitivity data
            if manifest.get(name):
                self.file_entry(manifest[name], name)
        rng_steps = take(manifest.get("rng_state") or {}, "steps", "rng_state", "a list", required=False)
        if rng_steps is not None and not all(_KINDS["an integer"](t) and 0 <= t <= num_steps for t in rng_steps):
            raise self.bad("rng_state.steps", f"is {rng_steps!r:.60}, not steps of the run")
        if manifest.get("sensitivity"):
            take(manifest["sensitivity"], "reference_replay_drift", "sensitivity", "a number", required=False)
        return status, num_steps

    def check_optimizer(self, optimizer: Mapping[str, Any]) -> None:
        """Optimizer fields are read with defaults (older recordings lack some), so only their types are checked."""
        take = self.take
        for key in ("lr", "eps", "weight_decay"):
            take(optimizer, key, "optimizer", "a number", required=False)
        take(optimizer, "decoupled", "optimizer", "true or false", required=False)
        betas = take(optimizer, "betas", "optimizer", "a list", required=False)
        if betas is not None and (len(betas) != 2 or not all(_KINDS["a number"](b) for b in betas)):
            raise self.bad("optimizer.betas", f"is {betas!r:.60}, not two numbers (beta1, beta2)")
        decays = take(optimizer, "weight_decays", "optimizer", "a list", required=False)
        if decays is not None and not all(_KINDS["a number"](d) for d in decays):
            raise self.bad("optimizer.weight_decays", "holds a value that is not a number")

    def check_steps(self, steps: list, status: str, num_steps: int) -> None:
        """One entry per training step, in order from 0, each with the first step's fields, within Adam's ranges."""
        if len(steps) > num_steps or (status == "complete" and len(steps) != num_steps):
            raise self.bad("steps", f"lists {len(steps)} training steps for a {status} run of num_steps = {num_steps}")
        for t, step in enumerate(steps):
            where = f"steps[{t}]"
            if not isinstance(step, dict):
                raise self.bad(where, f"is {step!r:.60}, not an object")
            # readers take the per-step scalars as columns named by the first step's fields
            for key in {"t": None, "lr": None, **steps[0]}:
                kind = ("an integer" if key in ("t", "batch") else "numbers" if key == "group_weight_decay"
                        else "a number")
                self.take(step, key, where, kind)
            if step["t"] != t:
                raise self.bad(f"{where}.t",
                               f"is {step['t']}: training steps must be listed once each, in order from 0")
            for key, allowed, within in _STEP_RANGES:  # values Adam could not have run with
                if key in step and not within(step[key]):
                    raise self.bad(f"{where}.{key}", f"is {step[key]!r}, outside {allowed}")

    def check_probes(self, probes: list, num_steps: int) -> None:
        """Probed steps increasing up to num_steps, each with its shard files and numeric scalars."""
        previous = -1
        for i, probe in enumerate(probes):
            where = f"probes[{i}]"
            if not isinstance(probe, dict):
                raise self.bad(where, f"is {probe!r:.60}, not an object")
            t = self.take(probe, "t", where, "an integer")
            if not previous < t <= num_steps:
                raise self.bad(f"{where}.t", f"is {t}: probed steps must be listed once each, in increasing order, up "
                               f"to num_steps = {num_steps}")
            previous = t
            shards = self.take(probe, "shards", where, "a list")
            if not shards:
                raise self.bad(f"{where}.shards", "is empty")
            for j, shard in enumerate(shards):
                self.file_entry(shard, f"{where}.shards[{j}]")
            for key in probe:
                if key not in ("t", "shards"):
                    self.take(probe, key, where, "a number")


class RecordingWriter:
    """Appends steps to a recording folder. Every rank writes its own probe shards; rank 0 owns the manifest.

    Example::

        writer = RecordingWriter.create(path, header, batches, order, initial_state)   # rank 0, once
        info = writer.write_probe_shard(t, rank, pool_outputs, positions, val_outputs)  # every rank
        writer.add_step(t, {"lr": 1e-3, ...}); writer.add_probe(t, [info, ...], {"val_loss": 2.3})
        writer.flush()                                                                   # manifest, atomically
        writer.finish()
    """

    def __init__(self, root: Path, manifest: dict[str, Any], lock: IO[str] | None = None) -> None:
        self.root = root
        self.manifest = manifest
        self.store_dtype = STORE_DTYPES[manifest["store_dtype"]]
        self.last_flush = time.monotonic()
        self._lock = lock

    def release(self) -> None:
        """Let another process write this recording (the lock also goes when this process dies)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        header: Mapping[str, Any],
        batches: Sequence[Sequence[int]],
        order: Sequence[int],
        initial_state: Mapping[str, torch.Tensor],
    ) -> "RecordingWriter":
        """Start a new recording (rank 0). ``header`` holds the run's identity: model, projection, optimizer, ..."""
        root = Path(path)
        if header.get("store_dtype") not in STORE_DTYPES:
            raise LplError(f"store_dtype must be one of {sorted(STORE_DTYPES)}, got {header.get('store_dtype')!r}.")
        root.mkdir(parents=True, exist_ok=True)
        lock = _lock_for_writing(root)
        try:
            if (root / MANIFEST).is_file():
                raise RecordingError(f"{root} already holds a recording; choose another dirpath or pass resume=True.")
            if (root / MANIFEST).exists():
                raise RecordingError(f"{root / MANIFEST} is not a file (a folder?); remove it or choose another "
                                     "dirpath.")
            manifest = {**header, "schema_version": SCHEMA_VERSION, "status": "recording", "steps": [], "probes": []}
            pool_info = _write_file(root, POOL_FILE, safetensors_bytes(pool_tensors(batches, order)))
            manifest["pool"] = {**pool_info, "num_batches": len(batches)}
            writer = cls(root, manifest, lock)
            writer.write_initial_state(initial_state)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        return writer

    def write_initial_state(self, initial_state: Mapping[str, torch.Tensor]) -> None:
        """(Re)write the weights before step 0, e.g. when a resumed recording restarts from the beginning."""
        self._replace_file("initial_state", INITIAL_STATE_FILE, safetensors_bytes(initial_state))

    def _replace_file(self, key: str, name: str, data: bytes, **extra: Any) -> None:
        def publish(entry: dict[str, Any]) -> None:
            self.manifest[key] = {**entry, **extra}
            self.flush()

        _replace_named_file(self.root, self.manifest.get(key), name, data, publish)

    def write_rng_state(self, states: Mapping[str, torch.Tensor], step: int = 0) -> None:
        """The RNG states training step ``step`` started from ("torch", and "cuda" for a CUDA run): every epoch's first
        step's (the recorder's choice since 2026-11-28), and those of steps before which something drew from the
        generators, so that retraining draws the same dropout masks step for step. The file holds every stored step
        and is rewritten whole (they are few)."""
        stored = Recording(self.root, self.manifest).rng_states()
        stored[step] = dict(states)
        self._write_rng_states(stored)

    def _write_rng_states(self, stored: Mapping[int, Mapping[str, torch.Tensor]]) -> None:
        tensors = {f"{t}/{name}": value for t, states in stored.items() for name, value in states.items()}
        self._replace_file("rng_state", RNG_STATE_FILE, safetensors_bytes(tensors), steps=sorted(stored))

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        header: Mapping[str, Any],
        batches: Sequence[Sequence[int]],
        order: Sequence[int],
        from_step: int,
    ) -> "RecordingWriter":
        """Continue a recording from step ``from_step`` (the checkpoint's global step), dropping later steps.

        Raises ``RecordingError`` when the folder is not a recording of the same run or misses steps before it.
        """
        root = Path(path)
        lock = _lock_for_writing(root) if root.is_dir() else None  # a missing folder: open() says so below
        try:
            return cls._resume(root, lock, header, batches, order, from_step)
        except BaseException:
            if lock is not None:
                lock.close()
            raise

    @classmethod
    def _resume(cls, root: Path, lock: IO[str] | None, header: Mapping[str, Any], batches: Sequence[Sequence[int]],
                order: Sequence[int], from_step: int) -> "RecordingWriter":
        manifest = Recording.open(root).manifest
        pool_sha256 = hashlib.sha256(safetensors_bytes(pool_tensors(batches, order))).hexdigest()
        expected = {**header, "pool": {"sha256": pool_sha256}}
        for field in IDENTITY_FIELDS:
            there, here = _field(manifest, field), _as_json(_field(expected, field))
            if there != here and not (field == "precision" and there is None):  # older recordings: not stored
                raise RecordingError(
                    f"{root} records a different run ({field}: {there!r:.200} there, {here!r:.200} here); use a new "
                    "dirpath or the original settings."
                )
        recorded = len(manifest["steps"])
        if recorded < from_step:
            raise RecordingError(
                f"{root} holds steps 0..{recorded - 1} but the checkpoint resumes at step {from_step}; "
                "the steps between were never recorded: resume from an earlier checkpoint or record anew."
            )
        manifest["steps"] = manifest["steps"][:from_step]
        manifest["probes"] = [p for p in manifest["probes"] if p["t"] < from_step]
        manifest["status"] = "recording"
        dropped = manifest.pop("sensitivity", None)  # built from the steps being replaced
        manifest["world_size"] = header.get("world_size", manifest.get("world_size"))
        writer = cls(root, manifest, lock)
        rng_states = Recording(root, manifest).rng_states()
        kept = {t: states for t, states in rng_states.items() if t < from_step}
        if len(kept) < len(rng_states):  # states of the steps being replaced
            writer._write_rng_states(kept)
        writer.flush()
        if dropped:  # the manifest no longer names it
            _remove_replaced(root, dropped["file"])
        return writer

    @classmethod
    def attach(cls, path: str | os.PathLike) -> "RecordingWriter":
        """A shard-only writer for ranks other than 0 (they never touch the manifest)."""
        return cls(Path(path), Recording.open(path).manifest)

    def _to_store(self, tensor: torch.Tensor, per_item_numel: int) -> torch.Tensor:
        # scalars (losses) stay fp32: fp16's 3 significant digits are too coarse for loss differences
        if tensor.is_floating_point() and per_item_numel > 1:
            stored = tensor.to(self.store_dtype)
            if not torch.isfinite(tensor).all() or _rounds_within_precision(tensor, stored, per_item_numel):
                return stored
            # out of the store dtype's range, above (infinities: Adam's sensitivity where v ~ 0) or below (zeros and
            # subnormals: a loss scaled down): keep this tensor in fp32; the reader casts every tensor to fp32 anyway
            return tensor.float()
        return tensor.float() if tensor.is_floating_point() else tensor

    def write_probe_shard(
        self,
        step: int,
        rank: int,
        pool_outputs: Sequence[Mapping[str, torch.Tensor]],
        positions: Sequence[int],
        val_outputs: Mapping[str, torch.Tensor] | None,
    ) -> dict[str, Any]:
        """Write one rank's probes of step ``step``: per pool batch outputs (stacked) and, on one rank, validation."""
        tensors: dict[str, torch.Tensor] = {"pool_positions": torch.tensor(list(positions), dtype=torch.int64)}
        if pool_outputs:
            names = list(pool_outputs[0])
            for name in names:
                stacked = torch.stack([out[name].detach().cpu() for out in pool_outputs])
                tensors[POOL_PREFIX + name] = self._to_store(stacked, pool_outputs[0][name].numel())
        for name, value in (val_outputs or {}).items():
            tensors[VAL_PREFIX + name] = self._to_store(value.detach().cpu(), value.numel())
        relative = f"{PROBE_DIR}/t{step:06d}_r{rank}.safetensors"
        # no metadata: safetensors writes its metadata map in hash order, which would make equal shards differ in bytes
        return _write_file(self.root, relative, safetensors_bytes(tensors))

    def add_step(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Record the unprojected facts of training step ``step`` (batch, lr, Adam hyperparameters), in order."""
        if step != len(self.manifest["steps"]):
            raise RecordingError(
                f"step {step} arrived but the recording holds steps 0..{len(self.manifest['steps']) - 1}; "
                "steps must be recorded once each, in order."
            )
        self.manifest["steps"].append({"t": step, **scalars})

    def add_probe(self, step: int, shards: Sequence[Mapping[str, Any]], scalars: Mapping[str, float]) -> None:
        """Record that all shards of probe step ``step`` are on disk (takes effect at the next ``flush``)."""
        self.manifest["probes"].append({"t": step, "shards": list(shards), **scalars})

    def flush(self) -> None:
        """Write the manifest (atomically) with the sizes of everything recorded so far."""
        probe_bytes = sum(s["bytes"] for p in self.manifest["probes"] for s in p["shards"])
        fixed = self.manifest["pool"]["bytes"] + self.manifest["initial_state"]["bytes"]
        self.manifest["sizes"] = {
            "probe_bytes": probe_bytes,
            "pool_bytes": self.manifest["pool"]["bytes"],
            "initial_state_bytes": self.manifest["initial_state"]["bytes"],
            "total_bytes": probe_bytes + fixed,
        }
        _write_manifest(self.root, self.manifest)
        self.last_flush = time.monotonic()

    def finish(self) -> None:
        """Mark the recording complete, write the manifest and release the writer's lock."""
        self.manifest["status"] = "complete"
        self.flush()
        self.release()


def _rounds_within_precision(tensor: torch.Tensor, stored: torch.Tensor, per_item_numel: int) -> bool:
    """Whether each recorded vector of ``tensor`` (its rows of ``per_item_numel`` values) is ``stored`` (the same,
    rounded) up to the store dtype's epsilon relative to the vector's norm, as rounding in its normal range keeps
    it: not where values overflowed to infinity or underflowed to zeros and subnormals."""
    error = torch.linalg.vector_norm((stored.float() - tensor.float()).reshape(-1, per_item_numel), dim=1,
                                     dtype=torch.float64)  # float64: the norms of tiny vectors would underflow
    size = torch.linalg.vector_norm(tensor.reshape(-1, per_item_numel), dim=1, dtype=torch.float64)
    return bool((error <= torch.finfo(stored.dtype).eps * size).all())


class Recording:
    """Read side of a recording folder; opening reads only the manifest.

    Example::

        rec = Recording.open("runs/ref/recording")
        rec.verify()                                   # sha256 of every file; RecordingError names a bad one
        for t in rec.probe_steps:
            update = rec.step(t)["update"]             # [num_pool_batches, proj_dim], store dtype
        theta0 = rec.initial_state()
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._pool: dict[str, torch.Tensor] | None = None
        self._verified: set[tuple[str, str]] = set()  # (file, sha256) that verify() hashed: once per object

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Recording":
        """Open a recording folder for reading; a missing, inconsistent or edited manifest (its fields, and its content
        against its own sha256) is an LplError. ``manifest`` holds the content, without the checksum field."""
        root = Path(path)
        return cls(root, _read_manifest(root))

    # ---- what the run was
    @property
    def status(self) -> str:
        return self.manifest["status"]

    @property
    def num_steps(self) -> int:
        """T: the number of training steps of the reference run."""
        return int(self.manifest["num_steps"])

    @property
    def recorded_steps(self) -> int:
        """How many training steps (from 0) are recorded; equals ``num_steps`` once the run completed."""
        return len(self.manifest["steps"])

    @property
    def proj_dim(self) -> int:
        return int(self.manifest["projection"]["proj_dim"])

    @property
    def probe_steps(self) -> list[int]:
        """The probed steps t in increasing order (T, after the last step, once the run completed)."""
        return [int(p["t"]) for p in self.manifest["probes"]]

    def _pool_tensors(self) -> dict[str, torch.Tensor]:
        if self._pool is None:
            self._pool = self._read_all(self.manifest["pool"])
        return self._pool

    @property
    def order(self) -> list[int]:
        """The pool batch trained at each step t = 0..T-1."""
        return self._pool_tensors()["order"].tolist()

    @property
    def batches(self) -> list[list[int]]:
        """Pool batch id -> its sample ids."""
        pool = self._pool_tensors()
        ids, offsets = pool["batch_ids"].tolist(), pool["batch_offsets"].tolist()
        return [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]

    @property
    def scalars(self) -> dict[str, list]:
        """Per recorded training step: ``t``, ``batch``, ``lr``, ``beta1``, ``beta2``, ``eps``, ``weight_decay``."""
        steps = self.manifest["steps"]
        names = list(steps[0]) if steps else []
        return {name: [s[name] for s in steps] for name in names}

    @property
    def probe_scalars(self) -> dict[str, list]:
        """Per probe step: ``t`` and the validation scalars (e.g. ``val_loss``)."""
        probes = self.manifest["probes"]
        names = [n for n in (probes[0] if probes else {}) if n != "shards"]
        return {name: [p[name] for p in probes] for name in names}

    # ---- tensors
    def _path(self, info: Mapping[str, Any]) -> Path:
        path = self.root / info["file"]
        try:
            size = path.stat().st_size
        except OSError:
            if self.status == "recording" and self._replaced_since_opened(info["file"]):
                raise RecordingError(f"{path} is gone: the recording was being written when it was opened and the "
                                     "run has replaced that file since (it does with the RNG states); open it again "
                                     "(Recording.open) to read what it holds now.") from None
            raise RecordingError(f"{path} is missing; the recording is incomplete.") from None
        if size != info["bytes"]:
            raise RecordingError(f"{path} has {size} bytes, the manifest says {info['bytes']}: truncated or replaced.")
        return path

    def _replaced_since_opened(self, name: str) -> bool:
        """Whether the manifest now on disk no longer names file ``name`` (a running writer replaced it)."""
        try:
            return f'"{name}"' not in json.dumps(_read_manifest(self.root))
        except RecordingError:
            return False

    def _read_all(self, info: Mapping[str, Any], names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        path = self._path(info)
        try:
            with safe_open(str(path), framework="pt") as handle:
                wanted = list(handle.keys()) if names is None else [n for n in names if n in handle.keys()]
                return {name: handle.get_tensor(name) for name in wanted}
        except RecordingError:
            raise
        except Exception as error:  # safetensors raises its own types on bad headers or data
            raise RecordingError(f"{path} is corrupted ({type(error).__name__}: {error}).") from None

    def _probe_entry(self, t: int) -> Mapping[str, Any]:
        for probe in self.manifest["probes"]:
            if probe["t"] == t:
                return probe
        raise RecordingError(f"step {t} was not probed; probed steps: {self.probe_steps}.")

    def step(self, t: int, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """What was probed at step t: pool quantities as [num_pool_batches, ...] (pool order), validation ones as is.

        ``names`` restricts the read to those quantities (the rest of the shards is not touched).
        """
        entry = self._probe_entry(t)
        wanted = None if names is None else {n for name in names for n in (POOL_PREFIX + name, VAL_PREFIX + name)}
        num_batches = int(self.manifest["pool"]["num_batches"])
        out: dict[str, torch.Tensor] = {}
        for shard in entry["shards"]:
            part = self._read_all(shard, None if wanted is None else wanted | {"pool_positions"})
            positions = part.pop("pool_positions", None)
            if positions is None:  # a damaged header that still parses (verify() names such files first)
                raise RecordingError(f"{self._path(shard)} holds no pool_positions: it is corrupted (verify() checks "
                                     "every file against the manifest).")
            for name, value in part.items():
                if name.startswith(VAL_PREFIX):
                    out[name[len(VAL_PREFIX) :]] = value
                    continue
                key = name[len(POOL_PREFIX) :]
                if key not in out:
                    out[key] = value.new_zeros((num_batches, *value.shape[1:]))
                out[key][positions] = value
        return out

    def initial_state(self) -> dict[str, torch.Tensor]:
        """The module's state_dict before the first training step."""
        return self._read_all(self.manifest["initial_state"])

    def rng_states(self) -> dict[int, dict[str, torch.Tensor]]:
        """Step -> the RNG states it started from, for every epoch's first step (step 0 alone in recordings made
        before 2026-11-28) and every step before which something drew from the generators ({} for recordings made
        before they were stored); verified against the manifest first."""
        info = self.manifest.get("rng_state")
        if not info:
            return {}
        self.verify(["rng_state"])  # small; read by retraining and rewritten whole by a writer (a resume)
        tensors = self._read_all(info)
        if "steps" not in info:  # one state, step 0's, under its bare names
            return {0: tensors}
        stored: dict[int, dict[str, torch.Tensor]] = {int(t): {} for t in info["steps"]}
        for key, value in tensors.items():
            step, _, name = key.partition("/")
            stored.setdefault(int(step), {})[name] = value
        return stored

    def sensitivity(self) -> tuple[dict[str, torch.Tensor], Mapping[str, Any]] | None:
        """The adjoint sensitivity tables and their manifest entry, or None when they were never built."""
        info = self.manifest.get("sensitivity")
        if not info:
            return None
        return self._read_all(info), info

    def write_sensitivity(self, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> None:
        """Add the sensitivity tables to a complete recording (file first, then the manifest, both atomically)."""
        if self.status != "complete":
            raise RecordingError(f"{self.root} is not complete (status {self.status!r}); finish the run first.")

        def publish(entry: dict[str, Any]) -> None:
            self.manifest["sensitivity"] = {**dict(info), **entry}
            _write_manifest(self.root, self.manifest)

        _replace_named_file(self.root, self.manifest.get("sensitivity"), SENSITIVITY_FILE, safetensors_bytes(tensors),
                            publish)

    def files(self) -> list[Mapping[str, Any]]:
        """Every file the manifest names, with its sha256 and size."""
        infos = [self.manifest[name] for name in FILE_ENTRIES if self.manifest.get(name)]
        return infos + [shard for probe in self.manifest["probes"] for shard in probe["shards"]]

    def verify(self, entries: Iterable[str] | None = None) -> None:
        """Check every file's size and sha256 against the manifest (the manifest itself, its fields and its own
        sha256, was checked by ``open``); raises ``RecordingError`` naming the bad file. ``entries`` restricts the check
        to those of the manifest's file entries (``FILE_ENTRIES``) that the recording has: the files a reader is about
        to use. A file is hashed once per Recording object, so callers that read it many times (``check_methods``
        retraining each order) pay for it once."""
        if entries is None:
            infos = self.files()
        elif isinstance(entries, str):
            raise LplError(f"verify() takes a list of entries, got the string {entries!r}; pass [{entries!r}].")
        else:
            unknown = sorted(set(entries) - set(FILE_ENTRIES))
            if unknown:
                raise LplError(f"verify() takes entries among {FILE_ENTRIES}, got {unknown}.")
            infos = [self.manifest[name] for name in entries if self.manifest.get(name)]
        for info in infos:
            key = (info["file"], info["sha256"])
            if key in self._verified:
                continue
            path = self._path(info)
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != info["sha256"]:
                raise RecordingError(f"{path} is corrupted: its sha256 does not match the manifest.")
            self._verified.add(key)
