"""Forward passes that reuse the unchanged prefix of the model.

Skipping experts at layer l leaves the vision tower and layers 0..l-1 untouched, so their
outputs from the reference pass are replayed instead of recomputed. The reference pass
records them with forward hooks; a replayed module's ``forward`` returns its recording.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["PrefixReplay", "media_encoders"]

MEDIA_ENCODER_NAMES = ("visual", "vision_tower", "vision_model", "audio_tower", "audio_model")


def media_encoders(model: nn.Module) -> list[nn.Module]:
    """Vision/audio encoders: their output never depends on expert skipping."""
    found = []
    for name, _ in model.named_modules():
        if name.rpartition(".")[2] in MEDIA_ENCODER_NAMES and not any(
            name.startswith(f"{p}.") for p in found
        ):
            found.append(name)
    return [model.get_submodule(name) for name in found]


class PrefixReplay:
    """Record the outputs of the media encoders and decoder layers, then replay a prefix."""

    def __init__(self, layers: nn.ModuleList, encoders: list[nn.Module]):
        self.layers = layers
        self.encoders = encoders
        self.outputs: dict[int, Any] = {}  # id(module) -> recorded output

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.outputs = {}
        handles = [m.register_forward_hook(self._record) for m in (*self.encoders, *self.layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.outputs[id(module)] = copy.copy(output)  # callers may reassign fields of output objects

    @contextmanager
    def replaying(self, first_recomputed_layer: int) -> Iterator[None]:
        """Encoders and layers ``< first_recomputed_layer`` return their recordings.

        Modules the recorded pass did not call (an image encoder on a text-only batch) are left
        alone. A ``forward`` a module already had on the instance (accelerate's dispatch hooks
        live there) is put back afterwards, not deleted.
        """
        prefix = [*self.encoders, *self.layers[:first_recomputed_layer]]
        modules = [m for m in prefix if id(m) in self.outputs]
        own_forwards = [m.__dict__.get("forward") for m in modules]
        for module in modules:
            recorded = self.outputs[id(module)]
            module.forward = lambda *args, _out=recorded, **kwargs: copy.copy(_out)
        try:
            yield
        finally:
            for module, forward in zip(modules, own_forwards, strict=True):
                if forward is None:
                    del module.forward  # back to the class's forward
                else:
                    module.forward = forward
