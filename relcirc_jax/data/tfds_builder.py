"""TFDS builder "relcirc_shapes": the training scenes written to files, for users who want a tfds dataset.

Built locally from the renderer (nothing to download); needs the optional extra: pip install 'relcirc_jax[tfds]'.
Importing this module registers the builder; nothing else in relcirc_jax imports it. Usage::

    import tensorflow_datasets as tfds
    import relcirc_jax.data.tfds_builder  # registers "relcirc_shapes"
    builder = tfds.builder("relcirc_shapes/64px", data_dir="/tmp/tfds")
    builder.download_and_prepare(file_format="array_record")  # array_record works without TensorFlow
    source = builder.as_data_source(split="train")

Record k of a split is example k % 256 of dataset.train_batch(seed, k // 256, global_batch=256, ...) with the
split's seed (train 0, validation 1), so the files hold exactly what the on-the-fly pipeline produces, in order.
"""

import dataclasses
import io

import numpy as np
from PIL import Image

from relcirc_jax.data import dataset, prompts
from relcirc_jax.data.spec import RELATIONS

try:
    import tensorflow_datasets as tfds
except ImportError as error:
    raise ImportError(
        "relcirc_jax.data.tfds_builder needs tensorflow-datasets: pip install 'relcirc_jax[tfds]'"
    ) from error

_GENERATION_BATCH = 256
_SPLIT_SEEDS = {"train": 0, "validation": 1}


@dataclasses.dataclass
class RelcircShapesConfig(tfds.core.BuilderConfig):
    """Image size, object radius, task, caption mix (None = the task's own) and split sizes of one variant."""

    size: int = 64
    radius: int = 8
    task: str = "paper"
    caption_mix: str | None = None
    num_train: int = 100_000
    num_validation: int = 10_000


def _png(image_uint8: np.ndarray) -> bytes:
    # PNG bytes made here keep TensorFlow out: tfds encodes numpy images with tf.image.
    buffer = io.BytesIO()
    Image.fromarray(image_uint8).save(buffer, format="PNG")
    return buffer.getvalue()


class RelcircShapes(tfds.core.GeneratorBasedBuilder):
    """Two coloured shapes on a gray canvas in one of 8 spatial relations, with a caption from the scene grammar."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": f"First release (VOCAB_VERSION {prompts.VOCAB_VERSION}).",
        "2.0.0": "The paper's task by default (dataset.TASKS); relation threshold 5 px at 128 px.",
    }
    BUILDER_CONFIGS = [
        RelcircShapesConfig(
            name="64px", description="64x64 images, radius 8 (the paper's main setting)", size=64, radius=8
        ),
        RelcircShapesConfig(name="128px", description="128x128 images, radius 16", size=128, radius=16),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.size
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3)),
                    "caption": tfds.features.Text(),
                    "caption_index": np.int32,
                    "relation": tfds.features.ClassLabel(names=RELATIONS),
                    "shape_idx": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "color_idx": tfds.features.Tensor(shape=(2,), dtype=np.int32),
                    "centers": tfds.features.Tensor(shape=(2, 2), dtype=np.float32),
                }
            ),
            supervised_keys=("caption", "image"),
            disable_shuffling=True,  # files keep the pipeline's order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        sizes = {"train": config.num_train, "validation": config.num_validation}
        return {split: self._generate_examples(_SPLIT_SEEDS[split], sizes[split]) for split in sizes}

    def _generate_examples(self, seed: int, num_examples: int):
        config = self.builder_config
        captions = prompts.all_captions()
        for step in range(-(-num_examples // _GENERATION_BATCH)):
            batch = dataset.train_batch(
                seed,
                step,
                global_batch=_GENERATION_BATCH,
                size=config.size,
                radius=config.radius,
                task=config.task,
                caption_mix=config.caption_mix,
            )
            images = np.rint((batch["image"] + 1.0) * 127.5).astype(np.uint8)
            for i in range(min(_GENERATION_BATCH, num_examples - step * _GENERATION_BATCH)):
                yield (
                    step * _GENERATION_BATCH + i,
                    {
                        "image": _png(images[i]),
                        "caption": captions[batch["caption_index"][i]],
                        "caption_index": batch["caption_index"][i],
                        "relation": batch["relation"][i],
                        "shape_idx": batch["shape_idx"][i],
                        "color_idx": batch["color_idx"][i],
                        "centers": batch["centers"][i],
                    },
                )
