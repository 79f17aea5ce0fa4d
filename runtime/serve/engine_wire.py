"""What front-end processes and the engine process say to each other (`kiln serve --frontends N`).

One Unix socket, length-prefixed msgpack frames (msgspec), one connection per front-end. Chosen by
measurement (`python -m kiln.bench.ipc`, 2-core Zen 4): a short request's message and its reply took
24 us round trip and 9 us of the sender's CPU over a Unix socket pair, against 114 us and 9-14 us
through ZeroMQ's ipc transport (its I/O thread adds two thread hops each way) and 66 us with pickle.

A front-end tokenizes and sends rows of token ids (`Run`); the engine batches them with every other
front-end's rows and answers each `Run` with its rows' outputs (`Ran`); the front-end finishes the
answers and, once the request is over, reports its outcome (`Done`) so the engine holds one set of
Triton statistics for the whole server. A generator's prompts go as text (`Generate`): the engine
opens a stream per prompt (`Opened`) and sends each stream's text as it is decoded (`Pieces`).
Times are `time.monotonic()` seconds, which every process on a host shares (CLOCK_MONOTONIC).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgspec
import numpy as np
from msgspec import Struct

HEADER = struct.Struct("<I")  # frame length
MAX_FRAME = 1 << 30


class Array(Struct, array_like=True):
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    @classmethod
    def of(cls, array: np.ndarray) -> Array:
        array = np.ascontiguousarray(array)
        return cls(array.dtype.str, array.shape, array.tobytes())

    def numpy(self) -> np.ndarray:
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype)).reshape(self.shape)


class ModelInfo(Struct, array_like=True):
    """A model the engine serves, as front-ends need to know it."""

    name: str
    version: str
    path: str
    provider: str
    sizes: dict[str, int]
    max_size: int  # rows per batch (Triton's max_batch_size)
    max_tokens: int
    max_delay: float
    max_queue: int
    instances: int


class IndexRow(Struct, array_like=True):
    name: str
    version: str
    state: str  # READY | UNAVAILABLE | LOADING
    reason: str


class Models(Struct, tag=True, array_like=True):
    """What the engine serves and its repository's index: the first frame on a connection, and sent to
    every front-end again after each change (a load, an unload, a version swap, a poll)."""

    generation: int  # counts the changes; a front-end that has mirrored generation g has seen them all
    control_mode: str
    models: list[ModelInfo]
    index: list[IndexRow]


class Mirrored(Struct, tag=True, array_like=True):
    """A front-end has mirrored the Models of this generation: versions it replaced may be freed."""

    generation: int


class Change(Struct, tag=True, array_like=True):
    """A repository load or unload asked through a front-end (the engine's control mode decides)."""

    id: int
    action: str  # load | unload
    name: str


class Changed(Struct, tag=True, array_like=True):
    """A Change done (the Models frame that shows it was sent first), or why not."""

    id: int
    generation: int
    error: tuple[str, str] | None


class Run(Struct, tag=True, array_like=True):
    """Rows of token ids to run through a model, batched with whatever else is queued."""

    id: int
    model: str
    version: str
    deadline: float | None  # time.monotonic() seconds
    company: bool  # other requests are in progress at the front-end: waiting for a batch may pay
    ids: list[bytes]  # per row, int64 token ids
    type_ids: list[bytes]


class Cancel(Struct, tag=True, array_like=True):
    """The caller of a Run went away: what is still queued is dropped."""

    id: int


class Ran(Struct, tag=True, array_like=True):
    """A Run's outcome: every row's outputs, or the error that ended it (a KilnError's class name
    and message, raised again at the front-end), with the stages its rows went through."""

    id: int
    outputs: list[dict[str, Array]] | None
    error: tuple[str, str] | None
    stages: list[tuple[str, float, float]]  # (stage, start, end)


class Done(Struct, tag=True, array_like=True):
    """A request's outcome, for Triton's statistics (counted once, in the engine)."""

    model: str
    ok: bool
    seconds: float
    count: int
    stages: dict[str, float]


class Statistics(Struct, tag=True, array_like=True):
    """Asks for Triton's statistics of one model (or every model: name "")."""

    id: int
    name: str
    version: str


class StatisticsAre(Struct, tag=True, array_like=True):
    id: int
    body: bytes  # the JSON form, as msgpack cannot hold every key type of it


class Generate(Struct, tag=True, array_like=True):
    """A generator's prompts (parameters already checked by the front-end), one stream each."""

    id: int
    model: str
    version: str
    deadline: float | None
    prompts: list[str]
    params: dict[str, Any]


class Opened(Struct, tag=True, array_like=True):
    """A Generate taken (per prompt: prefix, prompt tokens, whether it was cut) or refused whole."""

    id: int
    streams: list[tuple[str, int, bool]]
    error: tuple[str, str] | None


class Pieces(Struct, tag=True, array_like=True):
    """Text of one stream of a Generate (text, new tokens, finish reason); `error` ends the stream."""

    id: int
    index: int
    pieces: list[tuple[str, int, str | None]]
    error: tuple[str, str] | None = None


Message = (
    Models
    | Mirrored
    | Change
    | Changed
    | Run
    | Cancel
    | Ran
    | Done
    | Statistics
    | StatisticsAre
    | Generate
    | Opened
    | Pieces
)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


def frame(message: Message) -> bytes:
    body = _encoder.encode(message)
    return HEADER.pack(len(body)) + body


async def read(reader: asyncio.StreamReader) -> Message:
    """The next message; asyncio.IncompleteReadError when the peer has gone."""
    (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > MAX_FRAME:
        raise ConnectionError(f"frame of {length} bytes from the peer; the limit is {MAX_FRAME}")
    return _decoder.decode(await reader.readexactly(length))


class Outbox:
    """Frames written to a peer once per turn of the event loop: under load a turn makes many (a
    batch's answers, many requests' Runs), and one write of all of them is one system call, not one
    each. Used on the loop only."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self._loop = asyncio.get_running_loop()
        self._frames: list[bytes] = []

    def send(self, message: Message) -> None:
        if not self._frames:
            self._loop.call_soon(self._flush)
        self._frames.append(frame(message))

    def _flush(self) -> None:
        frames, self._frames = self._frames, []
        if not self.writer.is_closing():
            self.writer.write(b"".join(frames))
