"""Which models are served, by name and version, as Triton's model repository lays them out.

`--model-repository DIR`: each subdirectory is a model, named after it; it is a kiln package
itself (version 1), or holds numbered version subdirectories (`1/`, `2/`), each a package, of which
the highest is served. Control modes, as Triton's: `none` loads everything at start and refuses
load/unload; `explicit` loads what `--load-model` names (or everything) and takes load/unload
requests; `poll` rescans every `--repository-poll-secs` and loads what is new or changed.

A new version takes traffic only once it is loaded and warm; the version it replaces stops taking
new requests at that moment and finishes the ones it holds before its sessions are freed, so a
version swap under load fails no request. Positional packages (`kiln serve PKG ...`) are a
repository too, of fixed models.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.runtime.errors import ConfigError, KilnError, ModelNotServed, PackageError, RepositoryRefused
from kiln.runtime.manifest import MANIFEST_NAME
from kiln.runtime.serve.arguments import CONTROL_MODES
from kiln.runtime.serve.models import ServedModel

log = logging.getLogger("kiln.serve")


@dataclass(frozen=True)
class Source:
    """Where one version of a model lives."""

    name: str
    version: str
    path: Path

    def stamp(self) -> float:
        """When the package last changed (its manifest is written last, on export)."""
        manifest = self.path / MANIFEST_NAME
        return manifest.stat().st_mtime if manifest.is_file() else 0.0


@dataclass
class IndexEntry:
    name: str
    version: str
    state: str  # READY | UNAVAILABLE | LOADING | UNLOADING
    reason: str = ""


def scan(root: Path) -> dict[str, Source]:
    """The servable version (the highest) of every model in a repository directory."""
    if not root.is_dir():
        raise ConfigError(f"--model-repository {root} is not a directory")
    found = {}
    for entry in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (entry / MANIFEST_NAME).is_file():
            found[entry.name] = Source(entry.name, "1", entry)
            continue
        versions = sorted((int(v.name), v) for v in entry.iterdir() if v.is_dir() and v.name.isdigit())
        if versions:
            number, path = versions[-1]
            found[entry.name] = Source(entry.name, str(number), path)
    return found


class ModelTable:
    """The models served now, by name, and the index of every model known: what requests look up.
    A `Repository` fills it by loading packages; a front-end of `--frontends N` mirrors the engine's
    (kiln.runtime.serve.frontend.MirroredRepository)."""

    def __init__(self, control_mode: str = "none"):
        if control_mode not in CONTROL_MODES:
            raise ConfigError(f"--model-control-mode must be one of {', '.join(CONTROL_MODES)}")
        self.control_mode = control_mode
        self.models: dict[str, ServedModel] = {}
        self.states: dict[str, IndexEntry] = {}
        self.sources: dict[str, Source] = {}

    def get(self, name: str, version: str = "") -> ServedModel:
        model = self.models.get(name)
        if model is None:
            known = ", ".join(sorted(self.models)) or "none"
            raise ModelNotServed(f"unknown model {name!r}; served models: {known}")
        if version not in ("", model.version):
            raise ModelNotServed(f"model {name!r} has no version {version!r} loaded; it serves version {model.version}")
        return model

    def ready(self, name: str, version: str = "") -> bool:
        model = self.models.get(name)
        return model is not None and version in ("", model.version) and model.healthy

    def any_ready(self) -> bool:
        return any(model.healthy for model in self.models.values())

    def knows(self, name: str) -> bool:
        return name in self.models or name in self.sources

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        entries = [self.states.get(name) or IndexEntry(name, source.version, "UNAVAILABLE", "unloaded")
                   for name, source in sorted(self.sources.items())]  # fmt: skip
        return [e for e in entries if e.state == "READY"] if ready_only else entries


class Repository(ModelTable):
    """Models loaded from packages (`kiln serve PKG...` or `--model-repository`), swapped in warm and
    retired once the requests that hold them are done. `on_change` is called after every change of
    what is served or of the index (the engine of `--frontends N` tells its front-ends)."""

    def __init__(
        self,
        load: Callable[[Source], ServedModel],
        sources: dict[str, Source],
        control_mode: str = "none",
        root: Path | None = None,
        drain_seconds: float = 30.0,
    ):
        super().__init__(control_mode)
        self._load = load
        self.sources = sources
        self.root = root
        self.drain_seconds = drain_seconds
        self.retiring: dict[tuple[str, str], ServedModel] = {}  # replaced versions still finishing requests
        self.on_change: Callable[[], None] = lambda: None
        # after a change, whether everyone who looks models up has seen it: a replaced version is
        # freed only then (the engine of `--frontends N`: every front-end has mirrored the change)
        self.change_seen: Callable[[], Callable[[], bool]] = lambda: lambda: True
        self._locks: dict[str, asyncio.Lock] = {}

    def serving(self, name: str, version: str) -> ServedModel:
        """The model of that version: the current one, else a swapped-out one still finishing the
        requests prepared for it (a front-end that has not seen the swap yet)."""
        current = self.models.get(name)
        if current is not None and version in ("", current.version):
            return current
        return self.retiring.get((name, version)) or self.get(name, version)

    # ---- loading -------------------------------------------------------------------------------

    async def load_all(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else list(self.sources):
            await self._load_source(self._source(name))

    async def load(self, name: str) -> None:
        """RepositoryModelLoad: (re)load the model's newest version from disk."""
        self._allow_api()
        if self.root is not None:
            self.sources.update({k: v for k, v in scan(self.root).items() if k == name})
        await self._load_source(self._source(name))

    async def unload(self, name: str) -> None:
        self._allow_api()
        if name not in self.models:
            raise ModelNotServed(f"model {name!r} is not loaded")
        async with self._lock(name):
            model = self.models.pop(name)
            self.states[name] = IndexEntry(name, model.version, "UNAVAILABLE", "unloaded")
            self.on_change()
            await self._retire(model)

    async def poll(self, interval: float, stop: asyncio.Event) -> None:
        """poll mode: rescan the repository, load new or changed versions, unload removed models."""
        seen = {name: source.stamp() for name, source in self.sources.items()}
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return
            try:
                await self._rescan(seen)
            except Exception:  # a broken package or a vanishing directory must not end the polling
                log.exception("repository poll failed; trying again in %s s", interval)

    async def _rescan(self, seen: dict[str, Any]) -> None:
        current = scan(self.root) if self.root else {}
        for name, source in current.items():
            if source != self.sources.get(name) or source.stamp() != seen.get(name):
                self.sources[name] = source
                seen[name] = source.stamp()
                with contextlib.suppress(KilnError):  # logged and shown in the index as UNAVAILABLE
                    await self._load_source(source)
        for name in [n for n in self.models if n not in current]:
            self.sources.pop(name, None)
            async with self._lock(name):
                model = self.models.pop(name)
                self.states.pop(name, None)
                self.on_change()
                await self._retire(model)

    async def stop(self) -> None:
        for name in list(self.models):
            self.models.pop(name).stop()

    def _allow_api(self) -> None:
        if self.control_mode != "explicit":
            raise RepositoryRefused(
                f"explicit model load / unload is not allowed in model control mode {self.control_mode!r} "
                "(start kiln serve with --model-control-mode explicit)"
            )

    def _source(self, name: str) -> Source:
        if name not in self.sources:
            where = f"the repository {self.root}" if self.root else "the packages this server was started with"
            raise ModelNotServed(f"no model {name!r} in {where}")
        return self.sources[name]

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _load_source(self, source: Source) -> None:
        """Load off the event loop; swap in only once warm; then retire the old version."""
        async with self._lock(source.name):
            self.states[source.name] = IndexEntry(source.name, source.version, "LOADING")
            started = time.monotonic()
            try:
                model = await asyncio.to_thread(self._load, source)
            except Exception as exc:
                if not isinstance(exc, KilnError):  # onnxruntime's own, for one: the package is broken
                    log.exception("model %s: loading failed", source.name)
                    exc = PackageError(f"{source.path}: {type(exc).__name__}: {exc}")
                reason = str(exc)
                self.states[source.name] = IndexEntry(source.name, source.version, "UNAVAILABLE", reason)
                self.on_change()
                log.error("model load failed", extra={"fields": {"model": source.name, "reason": reason}})
                if isinstance(exc, PackageError | ConfigError):
                    raise RepositoryRefused(f"model {source.name!r} cannot be loaded: {reason}") from exc
                raise
            old = self.models.get(source.name)
            self.models[source.name] = model  # from here new requests reach the new version
            self.states[source.name] = IndexEntry(source.name, source.version, "READY")
            self.on_change()
            log.info(
                "model serving",
                extra={"fields": {"model": source.name, "version": source.version,
                                  "swap_s": round(time.monotonic() - started, 2)}},
            )  # fmt: skip
            if old is not None:
                await self._retire(old)

    async def _retire(self, model: ServedModel) -> None:
        """Wait (up to drain_seconds) for the requests that hold the model, then free it."""
        key = (model.name, model.version)
        if self.models.get(model.name) is not model:
            self.retiring[key] = model
        seen = self.change_seen()
        deadline = time.monotonic() + self.drain_seconds
        while (model.in_flight or not seen()) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self.retiring.pop(key, None)
        await asyncio.to_thread(model.stop)
