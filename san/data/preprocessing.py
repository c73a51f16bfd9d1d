"""The backbone's preprocessing as plain values: what the data layer and the trainer need.

The composition root (san.run, san.bench) reads them from the backbone
(`san.backbones.data_config`) and passes them in; the data layer knows no models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preprocessing:
    """Image size, normalisation and resize interpolation, from the backbone's pretrained config (never guessed)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
