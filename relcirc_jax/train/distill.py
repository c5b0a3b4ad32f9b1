"""Distillation: a trained reference model (the teacher) supplies the student's regression target.

With `config.train.teacher` set, the training target is (1 - w) * the data's + w * the teacher's prediction at the
same noisy image, timestep and caption (its own null caption on the caption-dropout rows), w =
`config.train.teacher_weight` (diffusion.losses.diffusion_loss). The teacher predicts the conditional mean that the
data target estimates from one noise draw at a time, so the student reads what the caption decides (the layout, at
high noise) from a far less noisy signal. What it is for: a model of another architecture or size learns the relation
on a CPU from a reference trained elsewhere (an MM-DiT from pretrained/rte_dit_micro). Measured on a 2-core CPU, it
did not make an MM-DiT micro learn faster than the data alone (README, "MM-DiT and contextual repulsion"): there the
steps it takes to learn to draw, not the target's noise, are the limit. The student's circuits descend from the
teacher's function, which a model card must say.

The teacher may differ from the student in architecture and size; it must read the same captions (same text encoder
and tables), draw the same images and predict the same quantity (TEACHER_FIELDS). Its weights are not part of the
train state: a resumed run loads them again from config.train.teacher.
"""

import dataclasses
from typing import Any, NamedTuple

import jax
import ml_collections

from relcirc_jax import pretrained
from relcirc_jax.errors import UserError
from relcirc_jax.models import arch
from relcirc_jax.parallel import rules as sharding_rules
from relcirc_jax.train import state as train_state

# The config fields a teacher must share with its student for its prediction to be a target.
TEACHER_FIELDS = ("text", "data.image_size", "model.in_channels", "model.prediction")


class Teacher(NamedTuple):
    model_cfg: arch.ModelConfig  # in the student's compute dtype
    params: Any  # float32, on the mesh with the teacher's own logical shardings


def load_teacher(setup: train_state.RunSetup) -> Teacher | None:
    """config.train.teacher's model, checked against the run's config and placed on its mesh; None if unset."""
    config = setup.config
    if not config.train.get("teacher"):
        return None
    teacher_config, params = pretrained.load(config.train.teacher)
    differences = pretrained.config_differences(config, teacher_config, fields=TEACHER_FIELDS)
    if differences:
        raise UserError(
            f"train.teacher={config.train.teacher} cannot teach this model: it differs in {'; '.join(differences)} "
            "(this run vs the teacher). Fix: use a teacher trained with the same text encoder, image size and "
            "model.prediction, or change those of this run to the teacher's."
        )
    model_cfg = dataclasses.replace(
        train_state.model_config(teacher_config, caption_channels=setup.conditioner.dim),
        dtype=train_state.compute_dtype(config, training=True),
        remat=False,  # no gradient flows through the teacher
    )
    abstract = jax.eval_shape(lambda: arch.init_params(model_cfg, jax.random.PRNGKey(0)))
    pretrained.check_compatible(params, abstract)
    rules = sharding_rules.rules_from_config(config.parallel.logical_axis_rules)
    shardings = sharding_rules.param_shardings(abstract, arch.logical_specs(model_cfg), setup.mesh, rules)
    return Teacher(model_cfg, jax.device_put(params, shardings))


def describe(teacher: Teacher, config: ml_collections.ConfigDict) -> str:
    size = sum(x.size for x in jax.tree.leaves(teacher.params)) / 1e6
    return (
        f"Distilling from the teacher {config.train.teacher} ({type(teacher.model_cfg).__name__}, {size:.2f}M params), "
        f"teacher_weight {config.train.teacher_weight}."
    )
