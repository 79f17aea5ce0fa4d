"""The decoder's onnxruntime sessions and their KV cache, for a batch of sequences.

Two layouts, as optimum-onnx exports them:
- decoder-only (GPT-2): one graph taking input_ids, attention_mask, position_ids and the past; the
  first step passes an empty past. Rows of different lengths share a batch: the past is left-padded
  and masked, each row has its own positions, so a new sequence can join a running batch.
- encoder-decoder (BART, T5, Marian): an encoder, a decoder for the first step and a decoder with
  past for the rest. These decoders take no mask over their own past, so only rows at the same
  decoder step can share a call (a cohort); the encoder side is right-padded and masked.

`Cache` is plain data: the past per name with the batch on axis 0; `select` and `join` are how rows
leave, are reordered (beams) and join.

With a `device` (`SessionOptions.kv_on_device`; on by default on CUDA) the decoder runs through
onnxruntime's IO binding: each step's `present` stays where the session made it (an OrtValue on the
GPU) and is bound as the next step's `past`, so the cache never crosses to the host while the batch
keeps its rows; only the logits come back for sampling. Rows joining, leaving or being reordered
(beams) take the cache to the host for that one step (`host`). On CPU the same path runs with
device "cpu", which is how its answers are checked against the plain path without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.runtime.errors import PackageError

if TYPE_CHECKING:
    import onnxruntime as ort

_ORT_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Cache:
    """The KV cache of a batch of rows. `past` holds the decoder's own keys and values (left-padded
    and masked by `mask` for a decoder-only model), `cross` the encoder's (right-padded, masked by
    `mask` for seq2seq), `length` each row's decoder length so far."""

    past: dict[str, np.ndarray]
    mask: np.ndarray
    length: np.ndarray
    cross: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.length)

    def tokens(self) -> int:
        """Cache entries held (a row's past length, plus its encoder length for seq2seq)."""
        return int(self.mask.sum() if not self.cross else self.length.sum() + self.mask.sum())

    def compact(self, keep: list[int]) -> tuple[list[int], Cache]:
        """The rows in `keep` (ascending) as a batch, for rows that finished: each kept row beyond
        len(keep) moves into the slot of a row that left, then every array is cut to len(keep) rows,
        a view that onnxruntime reads without a copy. `select` copied the whole cache each time a
        row finished: 38% of the decoding thread at 32 streams (py-spy). Changes the arrays in
        place, so only for a cache nothing else holds; returns which old row each new row is."""
        count, kept = len(keep), set(keep)
        holes = [row for row in range(count) if row not in kept]
        movers = [row for row in keep if row >= count]
        order = list(range(count))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        past, cross = (
            {k: _moved(host(v), holes, movers, count) for k, v in d.items()} for d in (self.past, self.cross)
        )
        return order, Cache(past, self.mask[order], self.length[order], cross)

    def select(self, rows: np.ndarray | list[int]) -> Cache:
        rows = np.asarray(rows, dtype=np.int64)
        return Cache(
            {k: host(v)[rows] for k, v in self.past.items()},
            self.mask[rows],
            self.length[rows],
            {k: host(v)[rows] for k, v in self.cross.items()},
        )


def _moved(array: np.ndarray, holes: list[int], movers: list[int], count: int) -> np.ndarray:
    if holes:
        array[holes] = array[movers]
    return array[:count]


def host(value: Any) -> np.ndarray:
    """A cache tensor as a numpy array (an OrtValue on a device is copied to the host)."""
    return value if isinstance(value, np.ndarray) else value.numpy()


class Bound:
    """Runs a session through IO binding: small inputs from the host, the past as OrtValues where it
    already is, `logits` back to the host, every other output left on `device`."""

    def __init__(self, session: ort.InferenceSession, device: str):
        import onnxruntime

        self.session, self.device = session, device
        self._ortvalue = onnxruntime.OrtValue

    def run(self, outputs: list[str], feeds: dict[str, Any]) -> list[Any]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, self._ortvalue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, "cpu" if name == "logits" else self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return [value.numpy() if name == "logits" else value for name, value in zip(outputs, values, strict=True)]


def _runner(session: ort.InferenceSession, device: str | None) -> Any:
    """`session.run`'s signature, bound to the device when there is one."""
    return Bound(session, device).run if device else session.run


class DecoderOnly:
    """A GPT-2-style decoder with past."""

    def __init__(self, session: ort.InferenceSession, pad_id: int, device: str | None = None):
        self.session = session
        self.run = _runner(session, device)
        self.pad_id = pad_id
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = ["present." + n[len("past_key_values.") :] for n in self.past_names]
        if not self.past_names or "position_ids" not in inputs:
            raise PackageError("the decoder graph takes no past_key_values/position_ids; export it with past")
        first = inputs[self.past_names[0]]
        self.heads, self.head_dim = first.shape[1], first.shape[3]
        self.dtype = _ORT_FLOATS.get(first.type, np.float32)
        self.outputs = ["logits", *self.present_names]

    def prefill(self, prompts: list[list[int]]) -> tuple[np.ndarray, Cache]:
        """Run left-padded prompts; the last position's logits per row, and their cache."""
        width = max(len(p) for p in prompts)
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = prompt
            mask[row, width - len(prompt) :] = 1
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1)
        empty = np.zeros((len(prompts), self.heads, 0, self.head_dim), dtype=self.dtype)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update({name: empty for name in self.past_names})
        logits, *present = self.run(self.outputs, feeds)
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        return logits[:, -1], Cache(dict(zip(self.past_names, present, strict=True)), mask, lengths)

    def step(self, cache: Cache, tokens: np.ndarray) -> tuple[np.ndarray, Cache]:
        """One new token per row; the logits for the next, and the grown cache."""
        mask = np.concatenate([cache.mask, np.ones((cache.rows, 1), dtype=np.int64)], axis=1)
        feeds = {"input_ids": tokens.reshape(-1, 1).astype(np.int64), "attention_mask": mask}
        feeds["position_ids"] = cache.length.reshape(-1, 1)
        feeds.update(cache.past)
        logits, *present = self.run(self.outputs, feeds)
        return logits[:, -1], Cache(dict(zip(self.past_names, present, strict=True)), mask, cache.length + 1)

    def can_join(self, a: Cache, b: Cache) -> bool:
        return True

    def teacher_forced(self, prompt: list[int], target: list[int]) -> np.ndarray:
        """The logits that predict each token of `target` after `prompt`, in one pass (the gate's
        measure of how far a lowered graph's numbers moved, free of where greedy paths part)."""
        ids = np.array([prompt + target[:-1]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(ids.shape[1])[None]}
        empty = np.zeros((1, self.heads, 0, self.head_dim), dtype=self.dtype)
        feeds.update({name: empty for name in self.past_names})
        (logits,) = self.session.run(["logits"], feeds)
        return logits[0, len(prompt) - 1 :]

    def join(self, a: Cache, b: Cache) -> Cache:
        """Two batches as one, the shorter past left-padded (and masked) to the longer."""
        width = max(a.mask.shape[1], b.mask.shape[1])
        past = {
            name: np.concatenate([_left_pad(host(a.past[name]), width), _left_pad(host(b.past[name]), width)])
            for name in a.past
        }
        mask = np.concatenate([_left_pad(a.mask, width, axis=1), _left_pad(b.mask, width, axis=1)])
        return _trimmed(Cache(past, mask, np.concatenate([a.length, b.length])))

    def trim(self, cache: Cache) -> Cache:
        return _trimmed(cache)


class EncoderDecoder:
    """An encoder and a decoder with past (BART, T5, Marian)."""

    def __init__(
        self,
        encoder: ort.InferenceSession,
        decoder: ort.InferenceSession,
        decoder_with_past: ort.InferenceSession,
        pad_id: int,
        start_id: int,
        device: str | None = None,
    ):
        self.encoder, self.decoder, self.decoder_with_past = encoder, decoder, decoder_with_past
        self.run_first, self.run_with_past = _runner(decoder, device), _runner(decoder_with_past, device)
        self.pad_id, self.start_id = pad_id, start_id
        names = [i.name for i in decoder_with_past.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.") and ".decoder." in n]
        self.cross_names = [n for n in names if n.startswith("past_key_values.") and ".encoder." in n]
        if not self.past_names or not self.cross_names:
            raise PackageError("the decoder-with-past graph takes no past_key_values; export it with past")
        self.present_names = [_present(n) for n in self.past_names]
        self.first_outputs = ["logits", *self.present_names, *(_present(n) for n in self.cross_names)]
        self.encoder_inputs = {i.name for i in encoder.get_inputs()}

    def prefill(self, sources: list[list[int]]) -> tuple[np.ndarray, Cache]:
        """Encode right-padded sources and run the decoder's first step from the start token."""
        width = max(len(s) for s in sources)
        ids = np.full((len(sources), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, source in enumerate(sources):
            ids[row, : len(source)] = source
            mask[row, : len(source)] = 1
        hidden = self._encode(ids, mask)
        start = np.full((len(sources), 1), self.start_id, dtype=np.int64)
        decoder_feeds = {"input_ids": start, "encoder_hidden_states": hidden, "encoder_attention_mask": mask}
        logits, *present = self.run_first(self.first_outputs, decoder_feeds)
        own, cross = present[: len(self.past_names)], present[len(self.past_names) :]
        cache = Cache(
            dict(zip(self.past_names, own, strict=True)),
            mask,
            np.ones(len(sources), dtype=np.int64),
            dict(zip(self.cross_names, cross, strict=True)),
        )
        return logits[:, -1], cache

    def step(self, cache: Cache, tokens: np.ndarray) -> tuple[np.ndarray, Cache]:
        feeds = {"input_ids": tokens.reshape(-1, 1).astype(np.int64), "encoder_attention_mask": cache.mask}
        feeds.update(cache.past)
        feeds.update(cache.cross)
        logits, *present = self.run_with_past(["logits", *self.present_names], feeds)
        past = dict(zip(self.past_names, present, strict=True))
        return logits[:, -1], Cache(past, cache.mask, cache.length + 1, cache.cross)

    def teacher_forced(self, prompt: list[int], target: list[int]) -> np.ndarray:
        """The logits that predict each token of `target` from the source `prompt`, in one pass."""
        ids = np.array([prompt], dtype=np.int64)
        mask = np.ones_like(ids)
        hidden = self._encode(ids, mask)
        decoder_ids = np.array([[self.start_id, *target[:-1]]], dtype=np.int64)
        decoder_feeds = {
            "input_ids": decoder_ids,
            "encoder_hidden_states": hidden,
            "encoder_attention_mask": mask,
        }
        (logits,) = self.decoder.run(["logits"], decoder_feeds)
        return logits[0]

    def _encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask}
        (hidden,) = self.encoder.run(
            ["last_hidden_state"], {k: v for k, v in feeds.items() if k in self.encoder_inputs}
        )
        return hidden

    def can_join(self, a: Cache, b: Cache) -> bool:
        """Only rows at the same decoder step: the decoder has no mask over its own past."""
        return a.length[0] == b.length[0]

    def join(self, a: Cache, b: Cache) -> Cache:
        width = max(a.mask.shape[1], b.mask.shape[1])
        past = {name: np.concatenate([host(a.past[name]), host(b.past[name])]) for name in a.past}
        cross = {
            name: np.concatenate([_right_pad(host(a.cross[name]), width), _right_pad(host(b.cross[name]), width)])
            for name in a.cross
        }
        mask = np.concatenate([_right_pad(a.mask, width, axis=1), _right_pad(b.mask, width, axis=1)])
        return Cache(past, mask, np.concatenate([a.length, b.length]), cross)

    def trim(self, cache: Cache) -> Cache:
        used = int(cache.mask.sum(axis=0).nonzero()[0].max()) + 1
        if used == cache.mask.shape[1]:
            return cache
        cross = {k: host(v)[:, :, :used] for k, v in cache.cross.items()}
        return Cache(cache.past, cache.mask[:, :used], cache.length, cross)


Decoder = DecoderOnly | EncoderDecoder


def _present(past_name: str) -> str:
    return "present." + past_name[len("past_key_values.") :]


def _left_pad(array: np.ndarray, width: int, axis: int = 2) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (missing, 0)
    return np.pad(array, pad)


def _right_pad(array: np.ndarray, width: int, axis: int = 2) -> np.ndarray:
    missing = width - array.shape[axis]
    if missing == 0:
        return array
    pad = [(0, 0)] * array.ndim
    pad[axis] = (0, missing)
    return np.pad(array, pad)


def _trimmed(cache: Cache) -> Cache:
    """Drop leading columns that no row uses (left padding left behind by rows that finished)."""
    used = cache.mask.any(axis=0)
    first = int(used.argmax()) if used.any() else cache.mask.shape[1]
    if first == 0:
        return cache
    return Cache({k: host(v)[:, :, first:] for k, v in cache.past.items()}, cache.mask[:, first:], cache.length)


def load_decoder(
    directory: Path, layout: dict, sessions: dict[str, ort.InferenceSession], pad_id: int, device: str | None = None
) -> Decoder:
    """The package's decoder; `device` keeps its KV cache there between steps (see the module doc)."""
    if layout["layout"] == "decoder-only":
        return DecoderOnly(sessions["decoder"], pad_id, device)
    return EncoderDecoder(
        sessions["encoder"],
        sessions["decoder"],
        sessions["decoder_with_past"],
        pad_id,
        layout["decoder_start_token_id"],
        device,
    )
