"""The local model store: what `pull` fetched and the GGUFs smallfour keeps.

Two places hold models:

- **The Hugging Face hub cache** (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else
  `~/.cache/huggingface/hub`), in its own layout: `models--OWNER--NAME/` with
  `blobs/<hash>`, `snapshots/<commit>/<file>` links and `refs/<revision>`.
  `smallfour pull` writes there, so `huggingface-cli`, `transformers` and
  llama.cpp's `-hf` see the same files, and files other tools fetched are
  usable here.
- **The smallfour area** `$SMALLFOUR_HOME` (default `~/.cache/smallfour`):
  `models/` for GGUFs kept under a short name (`smallfour run NAME`), and
  `pulls.json`, which records each pull: the revision asked for, the commit it
  pinned and the files taken.

A path that exists always wins over a repo id: `resolve_checkpoint` and
`resolve_gguf` look a name up in the store only when no such file or directory
exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from gguf import Keys, LlamaFileType

from quant.gguf_io import read_header
from quant.pipeline import METADATA_RECIPE
from smallfour.errors import SmallfourError

# owner/name, then optionally @revision, then optionally :variant (a GGUF quant, as in llama.cpp's -hf).
REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^:@\s]+))?"
                      r"(?::(?P<variant>[\w.-]+))?$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
INDEX_FILES = {"hf": "model.safetensors.index.json", "native": "consolidated.safetensors.index.json"}


# --- where things live ---------------------------------------------------------------------------


def smallfour_home() -> Path:
    return Path(os.environ.get("SMALLFOUR_HOME") or Path.home() / ".cache" / "smallfour").expanduser()


def gguf_dir() -> Path:
    """Where GGUFs kept under a short name live: `$SMALLFOUR_HOME/models`."""
    return smallfour_home() / "models"


def hub_cache() -> Path:
    """The Hugging Face hub cache, as huggingface_hub itself resolves it (HF_HUB_CACHE, HF_HOME, XDG)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def repo_folder(repo_id: str) -> Path:
    return hub_cache() / ("models--" + repo_id.replace("/", "--"))


def repo_id_of_folder(folder: Path) -> str | None:
    kind, sep, rest = folder.name.partition("--")
    return rest.replace("--", "/") if sep and kind == "models" and rest else None


@dataclass(frozen=True)
class RepoRef:
    repo_id: str
    revision: str | None = None
    variant: str | None = None

    def __str__(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return self.repo_id + revision + (f":{self.variant}" if self.variant else "")


def parse_repo_ref(text: str) -> RepoRef | None:
    """`owner/name[@revision][:variant]`, or None when `text` is not shaped like a repo id."""
    match = REPO_REF.match(text.strip())
    if not match:
        return None
    return RepoRef(match["repo"], match["revision"], match["variant"])


# --- the pull records ------------------------------------------------------------------------------


def records_path() -> Path:
    return smallfour_home() / "pulls.json"


def load_records() -> dict[str, dict]:
    try:
        records = json.loads(records_path().read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def _save_records(records: dict[str, dict]) -> None:
    path = records_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(records, indent=2, sort_keys=True))
    os.replace(temporary, path)


def record_pull(repo_id: str, revision: str, commit: str, files: list[str], kind: str, layout: str | None,
                total_bytes: int) -> dict:
    """Remember a finished pull: the revision asked for and the commit it resolved to (the pin)."""
    records = load_records()
    entry = records.get(repo_id, {})
    revisions = entry.get("revisions", {})
    revisions[commit] = {"revision": revision, "files": sorted(files), "bytes": total_bytes, "kind": kind,
                         "layout": layout, "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    records[repo_id] = {"commit": commit, "revision": revision, "hub_cache": str(hub_cache()), "revisions": revisions}
    _save_records(records)
    return records[repo_id]


def _forget(repo_id: str, commits: list[str] | None = None) -> None:
    records = load_records()
    if repo_id not in records:
        return
    if commits is None:
        del records[repo_id]
    else:
        entry = records[repo_id]
        for commit in commits:
            entry.get("revisions", {}).pop(commit, None)
        if not entry.get("revisions"):
            del records[repo_id]
        elif entry.get("commit") in commits:
            entry["commit"], latest = max(entry["revisions"].items(), key=lambda item: item[1].get("pulled_at", ""))
            entry["revision"] = latest["revision"]
    _save_records(records)


# --- snapshots -----------------------------------------------------------------------------------------


def _refs(folder: Path) -> dict[str, str]:
    """revision name → commit, from `refs/` (names may contain slashes: refs/pr/1)."""
    refs_dir = folder / "refs"
    found = {}
    if refs_dir.is_dir():
        for ref in refs_dir.rglob("*"):
            if ref.is_file():
                try:
                    found[ref.relative_to(refs_dir).as_posix()] = ref.read_text().strip()
                except OSError:
                    continue
    return found


def _snapshots(folder: Path) -> list[str]:
    snapshots = folder / "snapshots"
    return sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []


def snapshot_dir(ref: RepoRef) -> Path:
    """The snapshot directory `ref` names in the hub cache; a one-line error when it was never pulled."""
    folder = repo_folder(ref.repo_id)
    commits = _snapshots(folder)
    if not commits:
        raise SmallfourError(f"{ref.repo_id} is not in the model store ({hub_cache()}): "
                             f"run `smallfour pull {ref.repo_id}` first")
    refs = _refs(folder)
    if ref.revision:
        commit = refs.get(ref.revision)
        if commit is None:
            matches = [c for c in commits if len(ref.revision) >= 7 and c.startswith(ref.revision.lower())]
            commit = matches[0] if len(matches) == 1 else None
        if commit is None or commit not in commits:
            pulled = ", ".join(f"{name} ({c[:8]})" for name, c in sorted(refs.items())) or \
                ", ".join(c[:8] for c in commits)
            raise SmallfourError(f"revision {ref.revision} of {ref.repo_id} is not in the model store "
                                 f"(pulled: {pulled}): run `smallfour pull {ref.repo_id} --revision {ref.revision}`")
        return folder / "snapshots" / commit
    record = load_records().get(ref.repo_id, {})
    if record.get("commit") in commits:
        return folder / "snapshots" / record["commit"]
    if refs.get("main") in commits:
        return folder / "snapshots" / refs["main"]
    if len(commits) == 1:
        return folder / "snapshots" / commits[0]
    raise SmallfourError(f"{ref.repo_id} has {len(commits)} revisions in the model store: name one, "
                         f"e.g. {ref.repo_id}@{commits[0][:8]}")


def checkpoint_layout(directory: Path) -> str | None:
    """"hf" or "native" when `directory` looks like a checkpoint smallfour converts."""
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return "hf"
    if (directory / "params.json").is_file() and any(directory.glob("consolidated*.safetensors")):
        return "native"
    return None


def missing_shards(directory: Path, layout: str | None = None) -> tuple[list[str], int]:
    """(missing shard names, shards listed) per the checkpoint's safetensors index; ([], 0) without one."""
    layout = layout or checkpoint_layout(directory) or ("hf" if (directory / "config.json").is_file() else "native")
    index = directory / INDEX_FILES[layout]
    if not index.is_file():
        return [], 0
    try:
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
    except (OSError, ValueError, AttributeError):
        return [], 0
    listed = sorted(set(weight_map.values()))
    return [name for name in listed if not (directory / name).is_file()], len(listed)


def is_mmproj(path: Path | str) -> bool:
    return "mmproj" in Path(path).name.lower()


def gguf_groups(directory: Path) -> dict[str, list[Path]]:
    """Model GGUFs under `directory` (mmproj files apart), split parts grouped: name → parts in order."""
    groups: dict[str, list[Path]] = {}
    for path in sorted(directory.rglob("*.gguf")):
        if is_mmproj(path) or not path.is_file():
            continue
        relative = path.relative_to(directory).as_posix()
        groups.setdefault(SPLIT_PART.sub(".gguf", relative), []).append(path)
    return groups


def mmproj_for(gguf: Path) -> Path | None:
    """The vision projector that goes with `gguf`: a `*mmproj*.gguf` beside it, the most specific name first."""
    stem = SPLIT_PART.sub("", gguf.name).removesuffix(".gguf")
    candidates = [gguf.with_name(f"{stem}.mmproj.gguf"), gguf.with_name(f"{stem}-mmproj.gguf"),
                  gguf.with_name(f"mmproj-{stem}.gguf")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    generic = sorted(p for p in gguf.parent.glob("*.gguf") if p.name.lower().startswith("mmproj"))
    return generic[0] if generic else None


def _own_mmproj(gguf: Path) -> list[Path]:
    stem = gguf.name.removesuffix(".gguf")
    return [p for p in (gguf.with_name(f"{stem}.mmproj.gguf"), gguf.with_name(f"{stem}-mmproj.gguf"),
                        gguf.with_name(f"mmproj-{stem}.gguf")) if p.is_file()]


# --- resolving names given to convert and run ---------------------------------------------------------


def resolve_checkpoint(source: str) -> Path:
    """A checkpoint directory for `convert`: an existing path as is, else a pulled `owner/name[@revision]`."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    ref = parse_repo_ref(source)
    if ref is None or ref.variant:
        return path  # not a repo id: let the converter report the missing path
    if not repo_folder(ref.repo_id).is_dir():
        raise SmallfourError(f"{source} is neither a checkpoint directory nor a pulled model: "
                             f"run `smallfour pull {ref.repo_id}` first")
    snapshot = snapshot_dir(ref)
    layout = checkpoint_layout(snapshot)
    missing, listed = missing_shards(snapshot, layout)
    if missing:
        raise SmallfourError(_missing_message(ref, snapshot, missing, listed))
    if layout:
        return snapshot
    if gguf_groups(snapshot):
        raise SmallfourError(f"{source} holds GGUF files, not a checkpoint: run it directly (smallfour run {source})")
    raise SmallfourError(f"{source} ({snapshot}) has no safetensors checkpoint: run `smallfour pull {ref.repo_id}` "
                         "to finish the download")


def _missing_message(ref: RepoRef, snapshot: Path, missing: list[str], listed: int) -> str:
    index = INDEX_FILES["hf" if (snapshot / "config.json").is_file() else "native"]
    shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
    return (f"{ref} is missing {len(missing)} of {listed} shards listed in {index} ({shown}): "
            f"run `smallfour pull {ref.repo_id}` to finish the download")


def resolve_gguf(model: str) -> Path:
    """A GGUF file for `run`: an existing path as is, else a GGUF kept in the store under that name,
    else a pulled GGUF repo `owner/name[@revision][:variant]`."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if "/" not in model and gguf_dir().is_dir():
        for name, parts in gguf_groups(gguf_dir()).items():
            if model in (name, name.removesuffix(".gguf")):
                return parts[0]
    ref = parse_repo_ref(model)
    if ref is None or model.endswith(".gguf"):
        return path  # a file name: let the loader report that it is missing
    if not repo_folder(ref.repo_id).is_dir():
        raise SmallfourError(f"{model} is neither a GGUF file nor a pulled model: "
                             f"run `smallfour pull {ref.repo_id}` first")
    snapshot = snapshot_dir(RepoRef(ref.repo_id, ref.revision))
    groups = gguf_groups(snapshot)
    if not groups:
        if checkpoint_layout(snapshot):
            raise SmallfourError(f"{ref.repo_id} is a checkpoint, not a GGUF: convert it first "
                                 f"(smallfour convert {ref.repo_id} -o NAME.gguf)")
        raise SmallfourError(f"{ref.repo_id} ({snapshot}) holds no GGUF file")
    if ref.variant:
        chosen = {name: parts for name, parts in groups.items() if ref.variant.lower() in name.lower()}
        if not chosen:
            raise SmallfourError(f"{ref.repo_id} has no GGUF matching {ref.variant!r}; it has: {', '.join(groups)}")
    else:
        chosen = groups
    if len(chosen) > 1:
        raise SmallfourError(f"{ref.repo_id} has {len(chosen)} GGUFs ({', '.join(chosen)}): pick one, "
                             f"e.g. {ref.repo_id}:{_variant_hint(next(iter(chosen)))}")
    return next(iter(chosen.values()))[0]


def _variant_hint(name: str) -> str:
    stem = Path(name).name.removesuffix(".gguf")
    return re.split(r"[-.]", stem)[-1] or stem


# --- keeping a GGUF under a short name ------------------------------------------------------------------


def keep_gguf(source: Path, name: str, mmproj: Path | None = None) -> Path:
    """Put `source` (and its projector, as NAME-mmproj.gguf) in the store as `name`, replacing what was there.

    A hard link when the store is on the same file system (no copy of the weights), else a
    copy; either way under a temporary name, then renamed, so the store never shows half a file.
    """
    target = gguf_dir() / f"{name}.gguf"
    target.parent.mkdir(parents=True, exist_ok=True)
    pairs = [(source, target)] + ([(mmproj, gguf_dir() / f"{name}-mmproj.gguf")] if mmproj is not None else [])
    for origin, destination in pairs:
        if destination.exists() and destination.samefile(origin):
            continue
        temporary = destination.with_name(f".{destination.name}.{os.getpid()}.tmp")
        temporary.unlink(missing_ok=True)
        try:
            try:
                os.link(origin, temporary)
            except OSError:
                shutil.copyfile(origin, temporary)
            os.replace(temporary, destination)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    return target


# --- GGUF metadata, read from the header alone ------------------------------------------------------------


def gguf_recipe(path: Path) -> str | None:
    """The recipe a GGUF was made with: smallfour's own key, else llama.cpp's `general.file_type` name."""
    try:
        fields = read_header(path).fields
    except SmallfourError:
        return None
    if fields.get(METADATA_RECIPE):
        return str(fields[METADATA_RECIPE])
    file_type = fields.get(Keys.General.FILE_TYPE)
    if file_type is not None:
        try:
            name = LlamaFileType(int(file_type)).name
        except ValueError:
            return f"file_type {file_type}"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return None


def checkpoint_precision(directory: Path) -> str | None:
    """"fp8" or "bf16" as the checkpoint's config says."""
    for name, key in (("config.json", "quantization_config"), ("params.json", "quantization")):
        try:
            config = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        quant = config.get(key) if isinstance(config, dict) else None
        if isinstance(quant, dict):
            method = str(quant.get("quant_method") or quant.get("qformat_weight") or "quantized").lower()
            return "fp8" if "fp8" in method else method
        dtype = str(config.get("dtype") or config.get("torch_dtype") or "bf16") if isinstance(config, dict) else "bf16"
        return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, dtype)
    return None


# --- listing ---------------------------------------------------------------------------------------------


@dataclass
class LocalModel:
    name: str  # what to type: a repo id (with @revision / :variant when needed) or a store GGUF name
    kind: str  # "checkpoint", "gguf" or "partial"
    path: str
    bytes: int
    revision: str | None = None
    commit: str | None = None
    recipe: str | None = None  # GGUF: its recipe / file type; checkpoint: its precision
    mmproj: str | None = None  # the vision projector file beside a GGUF
    status: str = "ok"
    location: str = "hub"  # "hub" (the Hugging Face cache) or "store" ($SMALLFOUR_HOME/models)

    def as_json(self) -> dict:
        return asdict(self)


def _size(paths) -> int:
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            continue
    return total


def _hub_models() -> list[LocalModel]:
    cache = hub_cache()
    if not cache.is_dir():
        return []
    records = load_records()
    models: list[LocalModel] = []
    for folder in sorted(cache.glob("models--*")):
        repo_id = repo_id_of_folder(folder)
        if repo_id is None or not folder.is_dir():
            continue
        commits = _snapshots(folder)
        refs = _refs(folder)
        partial = list((folder / "blobs").glob("*.incomplete")) if (folder / "blobs").is_dir() else []
        entries: list[LocalModel] = []
        for commit in commits:
            snapshot = folder / "snapshots" / commit
            names = sorted(name for name, c in refs.items() if c == commit)
            pulled = records.get(repo_id, {}).get("revisions", {}).get(commit, {}).get("revision")
            revision = pulled or (names[0] if names else None)
            qualifier = f"@{revision or commit[:8]}" if len(commits) > 1 else ""
            layout = checkpoint_layout(snapshot)
            groups = gguf_groups(snapshot)
            configured = (snapshot / "config.json").is_file() or (snapshot / "params.json").is_file()
            if layout or (configured and not groups):
                missing, listed = missing_shards(snapshot, layout)
                status = "ok"
                if missing:
                    status = f"incomplete: {len(missing)} of {listed} shards missing"
                elif layout is None:
                    status = "incomplete: no weights"
                files = [p for p in snapshot.rglob("*") if p.is_file()]
                entries.append(LocalModel(repo_id + qualifier, "checkpoint", str(snapshot), _size(files), revision,
                                          commit, checkpoint_precision(snapshot), None, status))
            for name, parts in groups.items():
                variant = f":{_variant_hint(name)}" if len(groups) > 1 else ""
                projector = mmproj_for(parts[0])
                status = "ok"
                match = SPLIT_PART.search(parts[0].name)
                if match and len(parts) != int(match[2]):
                    status = f"incomplete: {len(parts)} of {int(match[2])} parts"
                entries.append(LocalModel(repo_id + qualifier + variant, "gguf", str(parts[0]), _size(parts), revision,
                                          commit, gguf_recipe(parts[0]), projector.name if projector else None, status))
        if partial and not entries:
            entries.append(LocalModel(repo_id, "partial", str(folder), _size(partial),
                                      status=f"partial download: {len(partial)} unfinished files"))
        elif partial:
            for entry in entries:
                entry.status += f", {len(partial)} unfinished downloads"
        models.extend(entries)
    return models


def _store_models() -> list[LocalModel]:
    directory = gguf_dir()
    if not directory.is_dir():
        return []
    models = []
    for name, parts in gguf_groups(directory).items():
        projector = mmproj_for(parts[0])
        models.append(LocalModel(name.removesuffix(".gguf"), "gguf", str(parts[0]), _size(parts),
                                 recipe=gguf_recipe(parts[0]), mmproj=projector.name if projector else None,
                                 location="store"))
    return models


def list_models() -> list[LocalModel]:
    """Every checkpoint and GGUF in the store: hub cache repos that hold one, and `$SMALLFOUR_HOME/models`."""
    return _store_models() + _hub_models()


# --- removing ---------------------------------------------------------------------------------------------


def remove(name: str) -> tuple[str, int]:
    """Remove a store GGUF (and its own mmproj) or a pulled repo / revision; (what went, bytes freed)."""
    if "/" not in name:
        for candidate in (gguf_dir() / name, gguf_dir() / f"{name}.gguf"):
            if candidate.is_file() and candidate.suffix == ".gguf":
                parts = [candidate]
                match = SPLIT_PART.search(candidate.name)
                if match:
                    stem = candidate.name[: match.start()]
                    parts = sorted(candidate.parent.glob(f"{stem}-?????-of-{match[2]}.gguf"))
                victims = parts + _own_mmproj(candidate)
                freed = _size(victims)
                for victim in victims:
                    victim.unlink()
                return ", ".join(v.name for v in victims), freed
    ref = parse_repo_ref(name)
    if ref is None:
        raise SmallfourError(f"no model named {name!r} in the store (see `smallfour models`)")
    if ref.variant:
        raise SmallfourError(f"rm removes a whole pulled repo or revision, not one GGUF of it: "
                             f"`smallfour rm {ref.repo_id}`")
    folder = repo_folder(ref.repo_id)
    if not folder.is_dir():
        raise SmallfourError(f"{ref.repo_id} is not in the model store (see `smallfour models`)")
    from huggingface_hub import scan_cache_dir

    if ref.revision:
        commit = snapshot_dir(ref).name
        info = scan_cache_dir(hub_cache())
        strategy = info.delete_revisions(commit)
        freed = strategy.expected_freed_size
        strategy.execute()
        if folder.is_dir():
            for ref_file in (folder / "refs").rglob("*") if (folder / "refs").is_dir() else []:
                if ref_file.is_file() and ref_file.read_text().strip() == commit:
                    ref_file.unlink()
        _forget(ref.repo_id, [commit])
        return f"{ref.repo_id}@{ref.revision} ({commit[:8]})", freed
    freed = _size(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    commits = _snapshots(folder)
    if commits:
        info = scan_cache_dir(hub_cache())
        info.delete_revisions(*commits).execute()
    if folder.exists():  # a repo with no complete revision (an interrupted first pull) is not in the scan
        shutil.rmtree(folder)
    locks = hub_cache() / ".locks" / folder.name
    shutil.rmtree(locks, ignore_errors=True)
    _forget(ref.repo_id)
    return ref.repo_id, freed


def human_bytes(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
