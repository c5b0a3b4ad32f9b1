"""Every axis name in one place: the device mesh's axes and the logical axes the model's parameters carry.

Mesh axes (parallel/mesh.py builds the mesh with them, in this order):

    DATA   data parallelism: each device holds a slice of the batch and a full copy of the parameters
    FSDP   fully sharded data parallelism: the batch and the parameters' EMBED dimension are split over it
    MODEL  tensor parallelism: attention heads, the MLP width and adaLN's outputs are split over it

The batch is split over BATCH_AXES = (DATA, FSDP). Logical axes name parameter dimensions (models/: every parameter is
annotated with one name or None per dimension); the logical axis rules (parallel/rules.py DEFAULT_RULES, settable as
config.parallel.logical_axis_rules) map each onto mesh axes:

    EMBED    the hidden width D
    HEADS    heads x head width: the output of to_q / to_k / to_v and the input of the output projection
    MLP      the MLP's hidden width (mlp_ratio x D)
    CAPTION  the text encoder's width (caption_channels)
    ADALN    adaLN modulation outputs: adaLN-single's 6 x D (DiT); per-block adaLN-Zero's 6 x D and the 2 x D of
             the continuous (scale, shift) norms (MM-DiT)
    TABLE    the rows of a scale-shift table (6 per block, 2 for the final layer)
    PATCH    the p x p x C values a token decodes to

One axis that is not the mesh's: SETTINGS, the axis an intervention screen (analysis/interventions.py) vmaps the
sampler over, one knob setting per index. A lax.cond inside the vmapped sampler reduces its predicate over it (the
contextual repulsion's "is any group on"), so a chunk of settings skips the work when none of them needs it, where a
predicate that differed per setting would make vmap compute both branches for all.
"""

DATA, FSDP, MODEL = "data", "fsdp", "model"
MESH_AXES = (DATA, FSDP, MODEL)
BATCH_AXES = (DATA, FSDP)

EMBED, HEADS, MLP, CAPTION, ADALN, TABLE, PATCH = "embed", "heads", "mlp", "caption", "adaln", "table", "patch"
LOGICAL_AXES = (EMBED, HEADS, MLP, CAPTION, ADALN, TABLE, PATCH)

SETTINGS = "settings"
