"""Weighted mixtures of training sources (big_vision's `{name: weight}`): each example comes from source
`name` with probability weight / sum(weights), drawn from (seed, process, worker, example count), so the
mixture's position is that count plus each source's own position, all saved in checkpoints.

    source_config("mixture", sources={
        "web": dict(kind="webdataset_stream", weight=0.9, args=dict(shards="gs://b/web/{00000..09999}.tar")),
        "curated": dict(kind="caption_folder", weight=0.1, args=dict(image_dir=..., captions_file=...)),
    }, on_exhausted="restart")

on_exhausted: "restart" reads every source in epochs forever (each reshuffled); "end" ends the mixture
when any source has been read through once.
"""
from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import grain
import numpy as np

from siglip_jax.data import streaming

ON_EXHAUSTED = ("restart", "end")
STATE_KIND = "mixture"


class MixtureSource:
    """Several sources with weights; `stream(...)` gives the mixed record stream of one process."""

    def __init__(self, sources: Mapping[str, Mapping[str, Any]], on_exhausted: str = "restart", *,
                 make_source: Callable[..., Any]):
        """`make_source(kind, **args)` builds each entry (data.sources passes its own: the table of kinds
        holds this one, so the mixture does not import it)."""
        if on_exhausted not in ON_EXHAUSTED:
            raise ValueError(f"on_exhausted is {on_exhausted!r}; valid: {', '.join(ON_EXHAUSTED)}.")
        if not sources:
            raise ValueError("A mixture needs sources: {name: dict(kind=..., weight=..., args=dict(...))}.")
        self.names, weights, self.sources = sorted(sources), [], {}
        for name in self.names:
            entry = dict(sources[name])
            unknown = sorted(set(entry) - {"kind", "weight", "args"})
            if unknown or "kind" not in entry:
                raise ValueError(f"Mixture source {name!r} has keys {sorted(entry)}; give kind, weight and args.")
            weight = float(entry.get("weight", 1.0))
            if not weight > 0:
                raise ValueError(f"Mixture source {name!r} has weight {weight}; weights must be positive.")
            weights.append(weight)
            self.sources[name] = make_source(entry["kind"], **dict(entry.get("args") or {}))
        self.weights = np.asarray(weights) / np.sum(weights)
        self.on_exhausted = on_exhausted

    def stream(self, *, seed: int, process_index: int, process_count: int, num_epochs: int = 0) -> "MixtureStream":
        if num_epochs:
            raise ValueError("A mixture inside a mixture is not supported; list all sources in one mixture.")
        epochs = 1 if self.on_exhausted == "end" else 0
        children = []
        for name in self.names:
            source = self.sources[name]
            child_seed = int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])
            if streaming.is_stream(source):
                children.append(source.stream(seed=child_seed, process_index=process_index, process_count=process_count, num_epochs=epochs))
            else:
                children.append(streaming.MapRecordStream(source, seed=child_seed, process_index=process_index,
                                                          process_count=process_count, num_epochs=epochs))
        return MixtureStream(children, self.names, self.weights, seed=seed, process_index=process_index)

    def __repr__(self) -> str:
        return "MixtureSource(" + ", ".join(f"{name}: {weight:.3g}" for name, weight in zip(self.names, self.weights)) + ")"


class MixtureStream(grain.IterDataset):
    def __init__(self, children: list[grain.IterDataset], names: list[str], weights: np.ndarray, *, seed: int, process_index: int):
        super().__init__(children)
        self.names, self.weights, self.seed, self.process_index = names, weights, seed, process_index
        self.worker_index = 0

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        self.worker_index = sl.start or 0
        for child in self.parents:
            child.set_slice(sl, sequential_slice)

    def __iter__(self) -> "_MixtureIterator":
        return _MixtureIterator([child.__iter__() for child in self.parents], self)


class _MixtureIterator(grain.DatasetIterator):
    def __init__(self, children: list[grain.DatasetIterator], stream: MixtureStream):
        super().__init__(children)
        self._children, self._stream, self._count = children, stream, 0

    def __next__(self) -> dict:
        stream = self._stream
        rng = np.random.default_rng([stream.seed, stream.process_index, stream.worker_index, self._count])
        choice = int(rng.choice(len(stream.names), p=stream.weights))
        record = next(self._children[choice])  # StopIteration (on_exhausted="end") ends the mixture
        self._count += 1
        return {**record, "source": stream.names[choice], "seed": [choice, *record["seed"]]}

    def get_state(self) -> dict[str, Any]:
        return {"kind": STATE_KIND, "count": self._count,
                "sources": {name: child.get_state() for name, child in zip(self._stream.names, self._children)}}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("kind") != STATE_KIND or sorted(state["sources"]) != self._stream.names:
            raise ValueError(f"The saved data position {state!r} is not of a mixture of {self._stream.names}; "
                             "resume with the sources the run started with, or use a new workdir.")
        self._count = int(state["count"])
        for name, child in zip(self._stream.names, self._children):
            child.set_state(state["sources"][name])
