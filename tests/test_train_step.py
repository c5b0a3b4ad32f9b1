"""One training step against a hand computation (clipping, AdamW, EMA), the lr and EMA warm-ups, caption dropout
reaching the learned null caption, remat gradients, bfloat16 compute over steps that really update the weights, and a
distillation teacher seeing exactly the student's inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from relcirc_jax import diffusion
from relcirc_jax.config import base_config
from relcirc_jax.data import dataset, prompts
from relcirc_jax.models import arch, cpu_bf16_matmul
from relcirc_jax.train import loop
from relcirc_jax.train import state as train_state
from relcirc_jax.train import step as train_step

# One recipe for every test here, each overriding only what it tests: the tests then share their compiled train steps
# and gradients (conftest's compilation cache) instead of compiling one of each per test. A constant lr from step 0;
# a clip that bites (the smoke model's grad norm is ~0.5), as the paper's 0.01 does; a visible weight decay; and a
# caption dropout that drops rows of every batch.
RECIPE = {
    "warmup_steps": 0,
    "lr": 1e-3,
    "adam_eps": 1e-6,
    "grad_clip": 0.05,
    "weight_decay": 0.1,
    "caption_dropout": 0.5,
}


def _config(**train):
    config = base_config("rte", "nano", "smoke")
    config.train.update({**RECIPE, **train})
    return config


def _run_setup(tmp_path, config, devices=1):
    setup = train_state.build_run_setup(config, tmp_path, devices=jax.devices()[:devices])
    setup.checkpointer.close()
    return setup


def _setup(tmp_path, config):
    """(setup, initial state, batch of step 0) on one device."""
    setup = _run_setup(tmp_path, config)
    state = train_state.init_state(setup.model_cfg, setup.tx, config.seed)
    return setup, state, loop._global_batch(config, setup.mesh, 0)


def _gradients(setup, params, batch, step=0):
    """d loss / d params of update `step`, computed outside the train step. Batch, caption and draws are arguments of
    the jitted gradient, not constants in it: one compilation serves every call with this config (across tests too,
    through conftest's compilation cache)."""
    config = setup.config
    text, mask = setup.conditioner.embed(setup.tables, batch)
    loss_fn = train_step.make_loss_fn(config, setup.model_cfg)
    draws = _draws(config, batch, step)
    return jax.jit(jax.grad(lambda *args: loss_fn(*args)[0]))(params, batch, text, mask, draws)


def _draws(config, batch, step):
    return train_step.draw_step(config, train_step.step_key(config.seed, jnp.int32(step)), batch["image"].shape)


def _step_fn(setup):
    return jax.jit(train_step.make_train_step(setup.config, setup.model_cfg, setup.conditioner, setup.tx))


def test_two_steps_apply_clipped_adamw_and_the_ema_to_the_loss_gradients(tmp_path):
    # Two steps: at init the zero-initialised output layer stops most gradients; the second step has them all.
    config = _config()
    setup, state, _ = _setup(tmp_path, config)
    t, step_fn = config.train, _step_fn(setup)
    params = initial = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
    ema, m, v = params, jax.tree.map(np.zeros_like, params), jax.tree.map(np.zeros_like, params)
    for k in (1, 2):  # by hand: global-norm clipping, Adam moments with bias correction, decoupled weight decay, EMA
        batch = loop._global_batch(config, setup.mesh, k - 1)
        grads = _gradients(setup, state.params, batch, step=k - 1)
        norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in jax.tree.leaves(grads)))
        state, metrics = step_fn(state, batch, setup.tables)
        assert abs(float(metrics["grad_norm"]) - norm) <= 1e-4 * norm and norm > t.grad_clip
        g = jax.tree.map(lambda x: np.asarray(x, np.float64) * min(1.0, t.grad_clip / norm), grads)
        m = jax.tree.map(lambda m_, g_: t.adam_b1 * m_ + (1 - t.adam_b1) * g_, m, g)
        v = jax.tree.map(lambda v_, g_: t.adam_b2 * v_ + (1 - t.adam_b2) * g_**2, v, g)
        params = jax.tree.map(
            lambda p, m_, v_: (
                p
                - t.lr
                * (m_ / (1 - t.adam_b1**k) / (np.sqrt(v_ / (1 - t.adam_b2**k)) + t.adam_eps) + t.weight_decay * p)
            ),
            params,
            m,
            v,
        )
        ema = jax.tree.map(lambda e, p: t.ema_decay * e + (1 - t.ema_decay) * p, ema, params)  # no EMA warm-up
    for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-3 * t.lr)
    for got, want in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(ema)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-3 * t.lr)
    moved = np.concatenate(
        [np.abs(np.asarray(a) - b).ravel() for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(initial))]
    )
    assert (moved > 1e-6).mean() > 0.9 and int(state.step) == 2 and float(metrics["lr"]) == pytest.approx(t.lr)


def test_the_lr_warms_up_from_zero_and_the_ema_warm_up_follows_the_early_weights(tmp_path):
    """The :cpu recipe's warm-ups, through the train step: lr = train.lr * step / warmup_steps (0 at the first
    update, so it leaves every weight as it was), and with train.ema_warmup the EMA decays by (1 + step) / (10 + step)
    (0.1, then 2/11) instead of train.ema_decay, so the EMA follows the first updates."""
    config = _config(warmup_steps=4, ema_warmup=True)
    setup, state, _ = _setup(tmp_path, config)
    step_fn = _step_fn(setup)
    initial = jax.tree.map(np.asarray, state.params)
    state, metrics = step_fn(state, loop._global_batch(config, setup.mesh, 0), setup.tables)
    assert float(metrics["lr"]) == 0.0
    for got, init, ema in zip(*map(jax.tree.leaves, (state.params, initial, state.ema_params))):
        np.testing.assert_array_equal(np.asarray(got), init)
        np.testing.assert_allclose(np.asarray(ema), init, rtol=1e-6, atol=1e-7)
    ema_before = jax.tree.map(np.asarray, state.ema_params)
    state, metrics = step_fn(state, loop._global_batch(config, setup.mesh, 1), setup.tables)
    assert float(metrics["lr"]) == pytest.approx(config.train.lr / 4)
    moved = 0
    leaves = zip(*map(jax.tree.leaves, (state.ema_params, ema_before, state.params, initial)))
    for ema, before, params, init in leaves:
        want = 2 / 11 * before + 9 / 11 * np.asarray(params)
        np.testing.assert_allclose(np.asarray(ema), want, rtol=1e-5, atol=1e-7)
        moved += int(np.any(np.asarray(params) != init))
    # the second update moved most weights (the first left them as they were), and the EMA most of the way with them
    assert moved > len(jax.tree.leaves(initial)) // 2


@pytest.mark.parametrize("warmup_steps", [0, 20])
def test_the_lr_decays_linearly_to_zero_over_the_last_fraction_of_the_steps(warmup_steps):
    """train.lr_decay_fraction: warm-up, constant, then the last fraction of train.num_steps decays linearly to 0,
    checked at every step against optax's own schedules joined at the decay's start; 0 leaves PixArt's schedule."""
    config = _config(num_steps=200, warmup_steps=warmup_steps, lr_decay_fraction=0.25)
    lr, steps = config.train.lr, np.arange(201)
    flat = optax.warmup_constant_schedule(0.0, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr)
    want = optax.join_schedules([flat, optax.linear_schedule(lr, 0.0, 50)], boundaries=[150])
    got = np.asarray(jax.vmap(train_state.learning_rate(config))(steps))
    np.testing.assert_allclose(got, np.asarray(jax.vmap(want)(steps)), rtol=1e-6, atol=1e-6 * lr)
    assert got[199] == pytest.approx(lr / 50) and got[200] == 0.0 and got[150] == pytest.approx(lr)
    config.train.lr_decay_fraction = 0.0
    np.testing.assert_array_equal(np.asarray(jax.vmap(train_state.learning_rate(config))(steps)), jax.vmap(flat)(steps))


def test_muon_orthogonalises_the_hidden_matrices_and_leaves_the_rest_to_adamw(tmp_path):
    # One update of random gradients. Adam's first step moves every weight by exactly lr (m / sqrt(v) = sign(g));
    # Muon's moves a hidden matrix by its orthogonalised (Nesterov) momentum: singular values of about one size.
    config = _config(optimizer="muon", weight_decay=0.0, grad_clip=1e6, adam_eps=1e-12)
    setup, state, _ = _setup(tmp_path, config)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, p.shape) for k, (_, p) in zip(keys, leaves)])
    updates, _ = jax.jit(setup.tx.update)(grads, setup.tx.init(state.params), state.params)
    muon = []
    for (path, g), u in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(updates)):
        name, u = jax.tree_util.keystr(path), np.asarray(u)
        if name.startswith("['transformer_blocks_") and name.endswith("['kernel']"):
            muon.append(name)
            singular = np.linalg.svd(u, compute_uv=False)
            # (a random gradient's spread from ~0 to max; Newton-Schulz lifts all but the very smallest near one size)
            assert np.percentile(singular, 10) > 0.5 * singular.max() and np.abs(u).std() > 0.2 * np.abs(u).mean()
        else:
            np.testing.assert_allclose(u, -config.train.lr * np.sign(np.asarray(g)), rtol=1e-5, err_msg=name)
    assert len(muon) == 2 * (4 + 4 + 2)  # 2 blocks x (self-attention q, k, v, out + cross-attention + MLP in, out)


def test_curriculum_words_the_first_steps_captions_by_its_mix_then_the_tasks(tmp_path):
    config = _config()
    config.data.curriculum_steps = 2
    config.data.num_scenes = None
    setup = _run_setup(tmp_path, config)
    for step, mix in ((0, "canonical"), (1, "canonical"), (2, None), (3, None)):
        want = dataset.train_batch(config.seed, step, global_batch=config.train.batch_size, caption_mix=mix)
        got = loop._global_batch(config, setup.mesh, step)
        np.testing.assert_array_equal(np.asarray(got["caption_index"]), want["caption_index"])
        np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])  # the same scenes, worded differently
    first = np.asarray(loop._global_batch(config, setup.mesh, 0)["caption_index"])
    captions = [prompts.all_captions()[k] for k in first]
    assert all(caption.count("red") + caption.count("blue") == 2 for caption in captions), captions


def test_data_relations_reach_the_training_batches(tmp_path):
    config = _config()
    config.data.relations = "uniform"
    setup = _run_setup(tmp_path, config)
    want = dataset.train_batch(
        config.seed, 1, global_batch=config.train.batch_size, relations="uniform", num_scenes=config.data.num_scenes
    )
    got = loop._global_batch(config, setup.mesh, 1)
    np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
    np.testing.assert_array_equal(np.asarray(got["caption_index"]), want["caption_index"])


def test_high_noise_share_reaches_the_timesteps_the_loss_is_taken_at(tmp_path):
    # The mixture itself is checked against its CDF in test_schedules_losses; this checks the step's draws use it.
    share, mean = 0.9, 3.0
    config = _config(caption_dropout=0.0, t_logit_mean=0.0, t_high_noise_share=share, t_high_noise_logit_mean=mean)
    config.model.prediction = "x0"  # its loss moves with the timesteps ~10x more than the epsilon loss does here
    setup, state, batch = _setup(tmp_path, config)
    keys = jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.params)))
    params = jax.tree.unflatten(  # away from init, whose zero output layers make the loss blind to the timestep
        jax.tree.structure(state.params),
        [p + 0.05 * jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(state.params))],
    )
    text, mask = setup.conditioner.embed(setup.tables, batch)
    key = train_step.step_key(config.seed, jnp.int32(0))
    model = arch.module(setup.model_cfg)

    def direct_loss(high_noise):  # diffusion_loss as loss_fn calls it, with draw_step's key split and no dropout
        noising = diffusion.draw_noising(
            jax.random.split(key)[1],
            batch["image"].shape,
            timestep_logit_normal=(config.train.t_logit_mean, config.train.t_logit_std),
            high_noise=high_noise,
        )
        return diffusion.diffusion_loss(
            lambda x_t, t: model.apply({"params": params}, x_t, t, text, mask),
            batch["image"],
            noising,
            learn_sigma=setup.model_cfg.learn_sigma,
            prediction=setup.model_cfg.prediction,
        )[0]

    def loss(share):
        config.train.t_high_noise_share = share
        draws = train_step.draw_step(config, key, batch["image"].shape)
        return float(train_step.make_loss_fn(config, setup.model_cfg)(params, batch, text, mask, draws)[0])

    mixed, plain = loss(share), loss(0.0)
    assert mixed == pytest.approx(float(direct_loss((share, mean, config.train.t_logit_std))), rel=1e-6)
    assert plain == pytest.approx(float(direct_loss(None)), rel=1e-6)
    assert abs(mixed - plain) > 5e-4 * plain  # 3e-3 measured; rounding differs by ~1e-7


@pytest.mark.parametrize("dropout", [0.0, RECIPE["caption_dropout"]])
def test_caption_dropout_is_what_trains_the_null_caption(tmp_path, dropout):
    config = _config(caption_dropout=dropout)
    setup, state, batch = _setup(tmp_path, config)
    step_fn = _step_fn(setup)
    for _ in range(3):  # zero-initialised output layers (final, cross-attention's) block the caption's gradient at init
        state, _ = step_fn(state, batch, setup.tables)
    null_grad = np.asarray(_gradients(setup, state.params, batch, step=3)["y_embedding"])
    if dropout:
        assert np.abs(null_grad).max() > 0.0  # some rows of this batch saw the null caption (tiny this early)
    else:
        assert np.abs(null_grad).max() == 0.0


def test_remat_gradients_equal_plain_gradients(tmp_path):
    setup, state, batch = _setup(tmp_path / "plain", _config())
    remat_setup = _run_setup(tmp_path / "remat", _config(remat=True))
    plain = _gradients(setup, state.params, batch)
    remat = _gradients(remat_setup, state.params, batch)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(plain))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("matrix_units", ["0", *cpu_bf16_matmul.runnable_libraries()])
def test_bfloat16_compute_follows_float32_over_steps_that_update_the_weights(tmp_path, monkeypatch, matrix_units):
    # bfloat16 Dense products by XLA's dot, oneMKL and oneDNN (models/cpu_bf16_matmul.py, forced on any CPU)
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, matrix_units)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        setup, state, _ = _setup(tmp_path / dtype, _config(compute_dtype=dtype))
        step = _step_fn(setup)
        initial, losses = state.params, []
        for s in range(4):
            state, metrics = step(state, loop._global_batch(setup.config, setup.mesh, s), setup.tables)
            losses.append(float(metrics["loss"]))
        runs[dtype] = (losses, jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, initial))
        assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(state.params))  # f32 master weights
    (f32_losses, f32_moves), (bf16_losses, bf16_moves) = runs["float32"], runs["bfloat16"]
    np.testing.assert_allclose(bf16_losses, f32_losses, rtol=0.03)
    a, b = (np.concatenate([x.ravel() for x in jax.tree.leaves(m)]) for m in (f32_moves, bf16_moves))
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert np.abs(b).mean() > 4e-4 and cosine > 0.9, (np.abs(b).mean(), cosine)  # moved, as the float32 run did


@pytest.mark.parametrize("matrix_units", ["0", "1"], ids=["xla_dot", "gemm_library"])
def test_auto_dtype_trains_in_bfloat16_only_through_the_matrix_units_and_samples_in_float32(
    tmp_path, monkeypatch, matrix_units
):
    monkeypatch.setenv(cpu_bf16_matmul.ENV_SWITCH, matrix_units)
    setup, state, batch = _setup(tmp_path, _config(compute_dtype="auto"))
    assert setup.model_cfg.dtype == "float32"  # what sampling, evaluation and the analyses compute in
    hlo = _step_fn(setup).lower(state, batch, setup.tables).as_text()
    on = matrix_units == "1"
    assert train_state.compute_dtype(setup.config, training=True) == ("bfloat16" if on else "float32")
    assert ("bf16" in hlo, hlo.count(cpu_bf16_matmul.TARGET) > 0) == (on, on)


def test_microbatches_accumulate_the_whole_batch_gradient_each_slice_with_its_own_draws(tmp_path):
    # Caption dropout 0.5 and per-example noise: a slice paired with other examples' draws (or drawing its own)
    # would give another gradient, not the whole batch's up to rounding.
    config = _config()
    setup, state, batch = _setup(tmp_path, config)
    state, _ = _step_fn(setup)(state, batch, setup.tables)  # step 1: the output layer is no longer all zeros
    text, mask = setup.conditioner.embed(setup.tables, batch)
    examples = (batch, text, mask, _draws(config, batch, 1))
    loss_and_grads = jax.jit(train_step.mean_loss_and_grads, static_argnums=(0, 3))
    loss_fn = train_step.make_loss_fn(config, setup.model_cfg)
    (whole_loss, whole), (sliced_loss, sliced) = (loss_and_grads(loss_fn, state.params, examples, k) for k in (1, 4))
    assert float(sliced_loss) == pytest.approx(float(whole_loss), rel=1e-6)
    scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(whole))
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5 * scale)


def test_a_microbatched_step_over_two_devices_is_the_whole_batch_step_and_keeps_the_batch_split(tmp_path):
    runs = {}
    for microbatches, devices in ((1, 1), (4, 2)):
        config = _config(microbatches=microbatches)
        setup = _run_setup(tmp_path / str(microbatches), config, devices)
        state = train_state.initial_state(setup)
        compiled = train_step.compile_train_step(setup, loop._global_batch(config, setup.mesh, 0))
        # Each slice takes rows of both devices' halves; slices of one device's rows would gather the batch.
        assert "all-gather" not in compiled.as_text()
        for step in range(2):
            state, metrics = compiled(state, loop._global_batch(config, setup.mesh, step), setup.tables, None)
        runs[microbatches] = (jax.device_get(state.params), {k: float(v) for k, v in metrics.items()})
    (whole, whole_metrics), (sliced, sliced_metrics) = runs[1], runs[4]
    assert sliced_metrics == pytest.approx(whole_metrics, rel=1e-5)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-3 * RECIPE["lr"])


def test_microbatches_hold_one_microbatch_of_activations(tmp_path):
    temporaries = {}
    for microbatches in (1, 8):
        config = _config(microbatches=microbatches)
        config.train.batch_size = 64
        setup = _run_setup(tmp_path / str(microbatches), config)
        compiled = train_step.compile_train_step(setup, loop._global_batch(config, setup.mesh, 0))
        temporaries[microbatches] = compiled.memory_analysis().temp_size_in_bytes
    assert temporaries[8] < temporaries[1] / 3, temporaries  # measured /4.6: /8 for the activations, + accumulators


def test_a_teacher_that_is_the_student_gives_zero_loss_and_gradient_so_it_sees_the_same_inputs(tmp_path):
    # Caption dropout 0.5 drops rows of every batch: a teacher given other null-caption rows, another caption, noise
    # or timestep than the student's would predict something else, and the loss would not be 0.
    config = _config(teacher_weight=1.0)
    setup, state, batch = _setup(tmp_path, config)
    text, mask = setup.conditioner.embed(setup.tables, batch)
    loss_fn = jax.jit(
        jax.value_and_grad(train_step.make_loss_fn(config, setup.model_cfg, setup.model_cfg), has_aux=True)
    )
    draws = _draws(config, batch, 1)  # step 1: the output layer is no longer all zeros
    params = _gradients(setup, state.params, batch)  # any weights with a non-zero output layer
    (loss, _), grads = loss_fn(params, batch, text, mask, draws, params)
    assert float(loss) == 0.0 and all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    other = jax.tree.map(lambda p: 0.9 * p, params)
    (other_loss, _), _ = loss_fn(params, batch, text, mask, draws, other)
    assert float(other_loss) > 0


def test_a_teacher_must_read_the_same_captions_and_predict_the_same_quantity(tmp_path):
    from relcirc_jax import pretrained
    from relcirc_jax.errors import UserError
    from relcirc_jax.train import distill

    teacher_config = _config()
    teacher_config.text.dim = 48
    teacher_config.model.prediction = "v"
    teacher = _run_setup(tmp_path / "t", teacher_config)
    pretrained.save(arch.init_params(teacher.model_cfg, jax.random.PRNGKey(0)), teacher_config, tmp_path / "teacher")
    config = _config(teacher=str(tmp_path / "teacher"))
    with pytest.raises(UserError, match=r"differs in model.prediction: 'eps' vs 'v'; text.dim: 32 vs 48 \(this run"):
        distill.load_teacher(_run_setup(tmp_path / "s", config))
    config.model.prediction, config.text.dim = "v", 48
    loaded = distill.load_teacher(_run_setup(tmp_path / "s2", config))
    assert loaded.model_cfg == teacher.model_cfg and len(jax.tree.leaves(loaded.params)) > 0
