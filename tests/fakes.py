"""Fakes are real subclasses of the model class: they only replace the part a test needs to control."""

from __future__ import annotations

import threading

from service.model import OnnxModel


class NeverReadyModel(OnnxModel):
    """Its load never finishes, like a model stuck downloading or compiling."""

    release = threading.Event()

    def load(self) -> None:
        self.release.wait()


class ExplodingModel(OnnxModel):
    """Loads for real, then fails inside inference: a server-side fault, not a client error."""

    def predict(self, batch):
        if not self.ready:
            return super().predict(batch)
        raise RuntimeError("simulated ONNX Runtime failure with a secret path /srv/internal")
