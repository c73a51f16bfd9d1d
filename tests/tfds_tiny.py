"""A tiny tensorflow-datasets builder: real tfds files for the exporter's tests, without downloads.

`tiny_vtab/vtab` has a 2,000-image train split, enough for the VTAB slice arithmetic of
eurosat's spec (val200 = train[60%:60%+200], test = train[80%:]); `tiny_vtab/small` is
small enough to keep as a committed fixture. Images are handed to tfds already PNG-encoded,
so generating ArrayRecord needs no TensorFlow (tfds encodes numpy images through it).
TFRecord cannot be written without TensorFlow; the committed TFRecord fixture
(tests/golden/tfds_tfrecord/) was made with TensorFlow 2.21 and tfds 4.9.10 by:

    <python with tensorflow and tensorflow-datasets==4.9.10> tests/tfds_tiny.py tests/golden/tfds_tfrecord
"""

from __future__ import annotations

import dataclasses
import io
import sys

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from san.data.vtab_spec import TASKS

SIZES = {"vtab": {"train": 2000, "test": 20}, "small": {"train": 30, "test": 10}}
CLASSES = 3


class TinyVtab(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name) for name in SIZES]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(4, 4, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(num_classes=CLASSES),
                    "file_name": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {
            split: self._generate_examples(split, count) for split, count in SIZES[self.builder_config.name].items()
        }

    def _generate_examples(self, split: str, count: int):
        rng = np.random.default_rng(len(split))
        for index in range(count):
            encoded = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(encoded, format="PNG")
            yield (
                index,
                {"image": encoded.getvalue(), "label": index % CLASSES, "file_name": f"{split}_{index:04d}.png"},
            )


# eurosat's slices and label rule on the tiny builder.
SPEC = dataclasses.replace(
    TASKS["eurosat"],
    name="tiny_vtab",
    tfds_name="tiny_vtab/vtab",
    reference_version="1.*.*",
    vpt_version="1.0.0",
    num_classes=CLASSES,
    test_count=400,
    id_feature="file_name",
    manual_download=None,
)


def prepare(data_dir: str, config: str = "vtab", file_format: str = "array_record") -> TinyVtab:
    builder = TinyVtab(config=config, data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare()
    return builder


if __name__ == "__main__":
    prepare(sys.argv[1], config="small", file_format="tfrecord")
