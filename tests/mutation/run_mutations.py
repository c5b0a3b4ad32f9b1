"""Mutation check: plant one bug behind each README promise in a copy of the tree and show the tests catch it.

Each mutant replaces one exact snippet of one file (the snippet must occur exactly once, so a refactor that moves the
code makes this script fail loudly instead of silently testing nothing), then runs the tests that own the promise in
the copy. A mutant is "killed" when those tests fail. The unmutated copy is run first on the same tests, so a kill
is the bug's doing. Prints a table and, as the last line, one JSON object {mutant: {"killed", "by", "seconds"}}.

    python tests/mutation/run_mutations.py [--set training|analysis|core|all] [--only resume,ema] [--keep]

The training set (the loop, the checkpointer, the data pipeline, the evaluator, the sampler) takes ~10-15 minutes on a
2-core CPU, the analysis set (head masks and patches in the model, ablation, patching, synopsis, QK screen, text
analyses, layout probe, dynamics, Vendi and the layout metrics, contextual repulsion and the baselines, the diversity
frontier) ~8 minutes, the core set (text encoder, parameterisation, timestep draws, distillation target, scene
relations, the optimizer's clipping and warm-ups, the EMA warm-up, bf16 export, the oneMKL bf16 products' sharded
sums and vmap, the MM-DiT's text mask, the evaluator's binding rules and loose margin, the EMA weights of the chosen
checkpoint, reference-model shapes, progressive resolution's position grid) ~7 minutes.
Not part of CI (.ci/run); run the set that covers a change before landing it.
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Mutant(NamedTuple):
    name: str
    promise: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


TRAINING_MUTANTS = (
    Mutant(
        "resume",
        "a restarted run resumes from its latest checkpoint",
        "relcirc_jax/train/loop.py",
        "restored = setup.checkpointer.restore_latest(setup.abstract_state, move_aside_unreadable=True)",
        "restored = None",
        ("tests/test_train_loop.py::test_stop_and_resume_is_bitwise_identical",),
    ),
    Mutant(
        "preemption_save",
        "SIGTERM saves a checkpoint, exits 0 and the run resumes",
        "relcirc_jax/train/loop.py",
        "            or preempted\n",
        "",
        ("tests/test_train_loop.py::test_sigterm_saves_exits_zero_and_resumes_bitwise",),
    ),
    Mutant(
        "budget_agreement",
        "on several processes a spent time budget stops all of them at the same step (process 0's clock decides)",
        "relcirc_jax/train/preemption.py",
        "return bool(multihost_utils.broadcast_one_to_all(np.asarray(self._clock() >= self._deadline)))",
        "return self._clock() >= self._deadline",
        ("tests/test_multiprocess.py::test_two_processes_stop_at_the_same_step_when_process_0s_budget_is_spent",),
    ),
    Mutant(
        "evaluated_step_save",
        "every evaluated step is saved, and checkpoint.keep_period keeps it",
        "relcirc_jax/train/loop.py",
        "            or done % config.eval.every_steps == 0\n",
        "",
        ("tests/test_train_loop.py::test_evaluated_steps_are_saved_and_keep_period_keeps_them_past_keep",),
    ),
    Mutant(
        "nan_stop",
        "a non-finite loss stops the run before anything is saved",
        "relcirc_jax/train/loop.py",
        "        if saving or periodic.due(done) or done % config.log.every_steps == 0:\n",
        "        if saving:\n            setup.checkpointer.save(done, state, _meta(config, done), force=True)\n"
        "        if saving or periodic.due(done) or done % config.log.every_steps == 0:\n",
        ("tests/test_train_loop.py::test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint",),
    ),
    Mutant(
        "save_before_evaluation",
        "the last step is saved before its sample grid and evaluation run",
        "relcirc_jax/train/loop.py",
        "        if saving:  # before sampling and evaluating: a failure or a hard kill there must not lose the step\n",
        "        periodic(state, done, writer, final=out_of_time)\n        if saving:\n",
        ("tests/test_train_loop.py::test_the_last_step_is_saved_before_its_evaluation_runs",),
    ),
    Mutant(
        "same_model",
        "a checkpoint of another model than the config's is refused, not loaded",
        "relcirc_jax/train/state.py",
        "    if differences:\n        raise UserError(",
        "    if False:\n        raise UserError(",
        ("tests/test_train_loop.py::test_a_checkpoint_of_another_model_stops_the_run_and_keeps_its_config",),
    ),
    Mutant(
        "checkpoint_fallback",
        "an unreadable newest checkpoint falls back to the previous one",
        "relcirc_jax/train/checkpoint.py",
        'errors.append(f"step {step}: {type(error).__name__}: {error}")\n                continue',
        "raise",
        ("tests/test_checkpoint.py::test_unreadable_latest_falls_back_with_a_warning_and_keeps_the_files",),
    ),
    Mutant(
        "optimizer_update",
        "a train step applies the optimizer update",
        "relcirc_jax/train/step.py",
        "params = optax.apply_updates(state.params, updates)",
        "params = state.params",
        ("tests/test_train_step.py::test_two_steps_apply_clipped_adamw_and_the_ema_to_the_loss_gradients",),
    ),
    Mutant(
        "ema",
        "sampling uses an exponential moving average of the weights",
        "relcirc_jax/train/ema.py",
        "return (decay * ema + (1.0 - decay) * param.astype(ema.dtype)).astype(ema.dtype)",
        "return param.astype(ema.dtype)",
        ("tests/test_train_step.py::test_two_steps_apply_clipped_adamw_and_the_ema_to_the_loss_gradients",),
    ),
    Mutant(
        "caption_dropout",
        "caption dropout trains the null caption CFG needs",
        "relcirc_jax/train/step.py",
        "jax.random.bernoulli(drop_key, recipe.caption_dropout, image_shape[:1])",
        "jax.random.bernoulli(drop_key, 0.0, image_shape[:1])",
        ("tests/test_train_step.py::test_caption_dropout_is_what_trains_the_null_caption",),
    ),
    Mutant(
        "microbatch_slices",
        "microbatches give the whole batch's update and keep the batch split over the data-parallel devices",
        "relcirc_jax/train/step.py",
        "return jnp.swapaxes(x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]), 0, 1)",
        "return x.reshape(microbatches, x.shape[0] // microbatches, *x.shape[1:])",
        (
            "tests/test_train_step.py::"
            "test_a_microbatched_step_over_two_devices_is_the_whole_batch_step_and_keeps_the_batch_split",
        ),
    ),
    Mutant(
        "data_process_count",
        "every process count sees the same global batch",
        "relcirc_jax/data/dataset.py",
        "np.random.default_rng([seed, step, k])",
        "np.random.default_rng([seed, step, k, process_index])",
        ("tests/test_dataset.py::test_process_slices_concatenate_to_the_single_process_batch",),
    ),
    Mutant(
        "relation_gate",
        "relation is scored only when each description matches exactly one object",
        "relcirc_jax/evaluation/scoring.py",
        "spatial = unique & ungated",
        "spatial = ungated",
        ("tests/test_scoring.py::test_a_second_matching_object_fails_both_relation_forms",),
    ),
    Mutant(
        "cfg",
        "sampling applies classifier-free guidance at eval.cfg_scale",
        "relcirc_jax/diffusion/guidance.py",
        "guided = uncond[..., :channels] + s * (cond[..., :channels] - uncond[..., :channels])",
        "guided = cond[..., :channels]",
        ("tests/test_samplers_vs_diffusers.py::test_cfg_guides_first_channels_in_one_batched_call",),
    ),
    Mutant(
        "time_budget",
        "a spent time budget saves and evaluates the last step",
        "relcirc_jax/train/loop.py",
        "periodic(state, done, writer, final=out_of_time)",
        "periodic(state, done, writer)",
        ("tests/test_train_loop.py::test_spent_time_budget_saves_samples_and_evaluates_the_last_step_then_stops",),
    ),
)


# Behind the circuit-analysis and diversity promises of README "Library" and issue 14/17's tests.
ANALYSIS_MUTANTS = (
    Mutant(
        "head_zero_ablation",
        "a zero head mask removes that head's output",
        "relcirc_jax/models/attention.py",
        "z = z * head_mask.astype(z.dtype)[None, None, :, None]",
        "z = z",
        ("tests/test_ablation.py::test_zeroing_a_last_layer_cross_head_leaves_upstream_exactly_unchanged",),
    ),
    Mutant(
        "head_mean_ablation",
        "mean ablation replaces a head's output by its mean over the rows of its group",
        "relcirc_jax/models/attention.py",
        "z = (keep * z.astype(jnp.float32) + (1 - keep) * group_mean(z, mean_group)).astype(z.dtype)",
        "z = (keep * z.astype(jnp.float32)).astype(z.dtype)",
        (
            "tests/test_ablation.py::test_mean_ablation_replaces_z_by_its_mean_over_the_rows_of_its_group_at_each_position",
        ),
    ),
    Mutant(
        "head_patch_source",
        "a patched head reads the output of the row patch_source names",
        "relcirc_jax/models/attention.py",
        "z = z + head_patch.astype(z.dtype)[:, None, :, None] * (z[patch_source] - z)",
        "z = z + head_patch.astype(z.dtype)[:, None, :, None] * (z[::-1] - z)",
        ("tests/test_patching.py::test_patching_one_head_copies_its_output_and_leaves_upstream_unchanged",),
    ),
    Mutant(
        "patch_window",
        "patching acts only at the timesteps inside patch_window",
        "relcirc_jax/models/dit.py",
        "gate = ((t >= patch_window[0]) & (t <= patch_window[1])).astype(jnp.float32)",
        "gate = (t >= patch_window[0]).astype(jnp.float32)",
        ("tests/test_patching.py::test_the_step_window_gates_the_patch",),
    ),
    Mutant(
        "ablation_prompt_bootstrap",
        "ablation intervals resample whole prompts",
        "relcirc_jax/analysis/ablation.py",
        "weights = bootstrap.cluster_weights(captions if clusters is None else clusters, num_resamples, seed)",
        "weights = bootstrap.cluster_weights(np.arange(len(captions)), num_resamples, seed)",
        ("tests/test_ablation.py::test_effect_intervals_resample_whole_prompts",),
    ),
    Mutant(
        "ablation_simultaneous_band",
        "simultaneous intervals keep their coverage over every screened head (studentized max)",
        "relcirc_jax/analysis/ablation.py",
        "q = np.percentile(studentized[:, 1:].max(axis=1), 95, axis=0)",
        "q = np.percentile(studentized[:, 1:].mean(axis=1), 95, axis=0)",
        ("tests/test_ablation.py::test_simultaneous_intervals_keep_their_coverage_over_every_screened_head",),
    ),
    Mutant(
        "synopsis_object_score",
        "an object head's score is each object's attention to its own shape word",
        "relcirc_jax/analysis/synopsis.py",
        'object_score = (cross[:, :, :, 0, ROLE["shape1"]] + cross[:, :, :, 1, ROLE["shape2"]]).mean(0) / 2',
        'object_score = (cross[:, :, :, 0, ROLE["shape2"]] + cross[:, :, :, 1, ROLE["shape1"]]).mean(0) / 2',
        ("tests/test_synopsis.py::test_scores_read_each_object_groups_attention_to_its_own_words",),
    ),
    Mutant(
        "synopsis_joint_split",
        "an MM-DiT's joint pattern is read at its image queries",
        "relcirc_jax/analysis/synopsis.py",
        "return joint[:, :, text_len:, :text_len], joint[:, :, text_len:, text_len:]",
        "return joint[:, :, :num_image_tokens, :text_len], joint[:, :, text_len:, text_len:]",
        ("tests/test_synopsis.py::test_an_mmdit_joint_pattern_splits_into_caption_and_image_keys",),
    ),
    Mutant(
        "object_masks_nearest",
        "a pixel both objects claim goes to the nearer object",
        "relcirc_jax/analysis/groups.py",
        "pixels[0][claimed_by_both & (distance[0] > distance[1])] = 0",
        "pixels[0][claimed_by_both & (distance[0] > distance[1])] = 1",
        ("tests/test_synopsis.py::test_image_token_groups_cover_each_object",),
    ),
    Mutant(
        "qk_reference_gradient",
        'the QK screen scores the relation "above" against the -y gradient',
        "relcirc_jax/analysis/qk_screen.py",
        '"above": -y,',
        '"above": y,',
        ("tests/test_qk_screen.py::test_planted_positional_head_ranks_first",),
    ),
    Mutant(
        "vendi_normalisation",
        "the Vendi score is exp of the entropy of the eigenvalues of K / N",
        "relcirc_jax/analysis/diversity.py",
        "rho = kernel / n",
        "rho = kernel / (n + 1)",
        ("tests/test_diversity.py::test_vendi_matches_float64_reference",),
    ),
    Mutant(
        "vendi_vjp",
        "the Vendi score's custom VJP equals autodiff",
        "relcirc_jax/analysis/diversity.py",
        "return (cotangent * ((vec * slope[None, :]) @ vec.T),)",
        "return (cotangent * ((vec * slope[None, :]) @ vec.T) / 2,)",
        ("tests/test_diversity.py::test_custom_vjp_matches_autodiff_and_finite_differences",),
    ),
    Mutant(
        "jacobi_round_robin",
        "Vendi's Jacobi sweeps pair every two indices once per sweep",
        "relcirc_jax/analysis/symeig.py",
        "later = pairs_adjacent(np.concatenate([players[:1], players[-1:], players[1:-1]]))",
        "later = pairs_adjacent(np.concatenate([players[-1:], players[:-1]]))",
        ("tests/test_symeig.py::test_eigh_matches_numpy_on_batches_of_every_kind",),
    ),
    Mutant(
        "repulsion_ascent",
        "contextual repulsion ascends the log-Vendi of each group",
        "relcirc_jax/analysis/repulsion.py",
        "return c + step * g",
        "return c - step * g",
        ("tests/test_repulsion.py::test_entropy_rises_monotonically_with_eta",),
    ),
    Mutant(
        "repulsion_branches",
        "the repulsion moves only the CFG branch it is asked to",
        "relcirc_jax/analysis/repulsion.py",
        "group_on = jnp.all(rows_on.reshape(batch // b, b), axis=1)",
        "group_on = jnp.ones(batch // b, bool)",
        ("tests/test_repulsion.py::test_branch_selection_moves_only_the_chosen_half",),
    ),
    Mutant(
        "frontier_gap_pairing",
        "the frontier gap's interval draws the same prompts for a setting and the CFG sweep",
        "relcirc_jax/analysis/frontier.py",
        'return acc, _nanmean(np.stack([p["vs_m_prompt"] for p in pts])[:, picks], axis=-1)',
        "vs = np.stack([p['vs_m_prompt'] for p in pts])[:, np.random.default_rng(len(pts)).permutation(picks)]\n"
        "        return acc, _nanmean(vs, axis=-1)",
        (
            "tests/test_frontier.py::test_the_gap_interval_is_paired_and_the_verdict_counts_only_settings_it_separates_from_zero",
        ),
    ),
    Mutant(
        "variance_partition_phrasing",
        "phrasing's share of the caption variance is what it explains beyond the relation",
        "relcirc_jax/analysis/text.py",
        'r2["phrasing"] -= r2["relation"]',
        "pass",
        ("tests/test_text_analysis.py::test_phrasing_is_its_share_within_relation",),
    ),
    Mutant(
        "relation_vector_sign",
        "relation vector arithmetic adds e(new) - e(old)",
        "relcirc_jax/analysis/text.py",
        "diff = new_text * new_mask[..., None] - old_text * old_mask[..., None]",
        "diff = old_text * old_mask[..., None] - new_text * new_mask[..., None]",
        ("tests/test_text_analysis.py::test_the_relation_delta_carries_a_held_out_caption_to_the_new_relation",),
    ),
    Mutant(
        "capture_conditional_half",
        "capture reduces the conditional half of the CFG batch",
        "relcirc_jax/train/sampling.py",
        "reduce({name: value[: text.shape[0]] for name, value in cache.items()}, batch)",
        "reduce({name: value[text.shape[0] :] for name, value in cache.items()}, batch)",
        ("tests/test_synopsis.py::test_planted_relation_head_is_ranked_first",),
    ),
    Mutant(
        "ablation_effect_baseline",
        "an ablation's effect is its accuracy minus the unablated accuracy",
        "relcirc_jax/analysis/ablation.py",
        "effect = accuracy - accuracy[:1]",
        "effect = accuracy",
        ("tests/test_ablation.py::test_effects_of_known_scenes",),
    ),
    Mutant(
        "patching_transfer",
        "patching's transfer is the share of the clean-to-corrupted change a patch reproduces",
        "relcirc_jax/analysis/patching.py",
        '"transfer": numerator.sum(1) / denominator.sum(),',
        '"transfer": numerator.sum(1) / np.sqrt(denominator.sum()),',
        ("tests/test_patching.py::test_transfer_is_the_share_of_the_change",),
    ),
    Mutant(
        "qk_pearson_centring",
        "the QK screen correlates each logit map with the reference gradients (Pearson)",
        "relcirc_jax/analysis/qk_screen.py",
        "a = maps - maps.mean(-1, keepdims=True)",
        "a = maps",
        ("tests/test_qk_screen.py::test_planted_positional_head_ranks_first",),
    ),
    Mutant(
        "dynamics_checkpoints",
        "dynamics spreads max_checkpoints evenly from the first to the last saved step",
        "relcirc_jax/analysis/dynamics.py",
        "picks = np.unique(np.linspace(0, len(saved) - 1, max_checkpoints).round().astype(int))",
        "picks = np.arange(max_checkpoints)",
        ("tests/test_dynamics.py::test_select_steps",),
    ),
    Mutant(
        "probe_centring",
        "the layout probe reads within-prompt deviations",
        "relcirc_jax/analysis/probe.py",
        "out[..., rows, :] -= out[..., rows, :].mean(-2, keepdims=True)",
        "out[..., rows, :] -= out.mean(-2, keepdims=True)",
        ("tests/test_probe.py::test_centring_per_prompt_leaves_each_prompt_mean_zero",),
    ),
    Mutant(
        "repulsion_window",
        "the repulsion acts during the first tau solver steps only",
        "relcirc_jax/analysis/repulsion.py",
        "return np.array([timesteps[min(tau, num_steps) - 1], timesteps[0]], np.float32)",
        "return np.array([timesteps[-1], timesteps[0]], np.float32)",
        ("tests/test_repulsion.py::test_windows_and_thirds",),
    ),
    Mutant(
        "interval_guidance",
        "interval guidance applies CFG inside its window only",
        "relcirc_jax/analysis/baselines.py",
        "inside = (t >= window[0]) & (t <= window[1])",
        "inside = t >= window[0]",
        ("tests/test_baselines.py::test_guidance_scale_is_one_outside_the_window",),
    ),
    Mutant(
        "particle_guidance_sign",
        "particle guidance pushes the samples of a group apart",
        "relcirc_jax/analysis/baselines.py",
        "moved = eps[..., :channels] - (weight * force).astype(eps.dtype)",
        "moved = eps[..., :channels] + (weight * force).astype(eps.dtype)",
        ("tests/test_baselines.py::test_particle_guidance_pushes_each_group_apart_and_only_within_it",),
    ),
    Mutant(
        "cads_schedule",
        "CADS anneals the caption most at high noise",
        "relcirc_jax/analysis/baselines.py",
        "return jnp.clip((tau2 - tau) / jnp.maximum(tau2 - tau1, 1e-6), 0.0, 1.0)",
        "return jnp.clip((tau - tau1) / jnp.maximum(tau2 - tau1, 1e-6), 0.0, 1.0)",
        ("tests/test_baselines.py::test_cads_anneals_the_caption_most_at_high_noise",),
    ),
    Mutant(
        "enc_correct_only",
        "ENC counts only a group's correct samples",
        "relcirc_jax/analysis/diversity.py",
        "values = np.asarray(_masked_vendi(features, correct, jnp.float32(sigma), float(q)), np.float64)",
        "values = np.asarray(_masked_vendi(features, np.ones_like(correct), jnp.float32(sigma), float(q)), np.float64)",
        ("tests/test_diversity.py::test_matched_size_vendi_and_enc_on_toy_groups",),
    ),
    Mutant(
        "mmd_unbiased",
        "MMD^2 is the unbiased U-statistic (within-sample diagonals left out)",
        "relcirc_jax/analysis/diversity.py",
        "return float((kxx - n) / (n * (n - 1)) + (kyy - m) / (m * (m - 1)) - 2.0 * kxy / (n * m))",
        "return float(kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2.0 * kxy / (n * m))",
        ("tests/test_diversity.py::test_marginal_metrics_on_toy_layouts",),
    ),
    Mutant(
        "knn_radius",
        "k-NN precision, recall and coverage use each point's k-th nearest other point",
        "relcirc_jax/analysis/diversity.py",
        "np.sqrt(np.partition(d2, k, axis=1)[:, k])",
        "np.sqrt(np.partition(d2, k, axis=1)[:, k - 1])",
        ("tests/test_diversity.py::test_knn_balls_reach_the_kth_nearest_other_point",),
    ),
    Mutant(
        "random_heads_exclude_chosen",
        "the random head sets an ablated set is compared with leave the chosen heads out",
        "relcirc_jax/analysis/ablation.py",
        "others = [h for h in pool if h not in chosen]",
        "others = pool",
        ("tests/test_ablation.py::test_head_set_masks_draw_random_sets_of_the_same_kinds",),
    ),
    Mutant(
        "repulsion_token_roles",
        "a repulsion by token role moves only the caption tokens of those roles",
        "relcirc_jax/analysis/repulsion.py",
        "return text_mask & keep[roles]",
        "return text_mask",
        (
            "tests/test_repulsion.py::test_token_masks_move_only_their_tokens_and_the_negative_caption_counts_as_padding",
        ),
    ),
    Mutant(
        "negative_caption_roles",
        "the negative caption's tokens count as padding for a repulsion by role",
        "relcirc_jax/analysis/repulsion.py",
        'return jnp.concatenate([roles, jnp.full_like(roles, TEXT_ROLES.index("pad"))])',
        "return jnp.concatenate([roles, roles])",
        (
            "tests/test_repulsion.py::test_token_masks_move_only_their_tokens_and_the_negative_caption_counts_as_padding",
        ),
    ),
    Mutant(
        "special_token_role",
        "an encoder's special tokens get a role of their own",
        "relcirc_jax/analysis/groups.py",
        'return np.where(roles == SPECIAL_ROLE, TEXT_ROLES.index("special"), roles)',
        "return roles",
        ("tests/test_synopsis.py::test_a_cached_encoders_special_tokens_get_the_special_role",),
    ),
)
# Behind the model, text, data, diffusion and recipe promises (README "Library", "Training"): numerics the oracle
# tests pin, and recipe switches that only a run would show.
CORE_MUTANTS = (
    Mutant(
        "bf16_sharded_contraction",
        "a oneMKL bf16 product whose contraction is sharded sums the devices' partial products",
        "relcirc_jax/models/cpu_bf16_matmul.py",
        "return lax.psum(out, k_axes) if k_axes else out",
        "return out",
        ("tests/test_cpu_bf16_matmul.py::test_sharded_products_equal_one_device_and_keep_the_rows_sharded",),
    ),
    Mutant(
        "bf16_vmap_rows",
        "vmap over a oneMKL product's rows folds the batch into the rows and back in order",
        "relcirc_jax/models/cpu_bf16_matmul.py",
        "return rows.reshape(axis_size, a.shape[1], rows.shape[-1]), True",
        "return rows.reshape(a.shape[1], axis_size, rows.shape[-1]).swapaxes(0, 1), True",
        ("tests/test_cpu_bf16_matmul.py::test_vmap_over_the_rows_is_one_product_and_other_batchings_are_exact",),
    ),
    Mutant(
        "bf16_library_choice",
        "the bf16 path takes oneDNN on an AVX512-BF16 CPU without AMX (oneMKL's bf16 is slow on AMD), else oneMKL",
        "relcirc_jax/models/cpu_bf16_matmul.py",
        'return ("onednn", "mkl") if onednn_first else ("mkl", "onednn")',
        'return ("mkl", "onednn")',
        ("tests/test_cpu_bf16_matmul.py::test_auto_takes_onednn_on_avx512_bf16_without_amx_else_onemkl",),
    ),
    Mutant(
        "rte_positions",
        "RTE adds a sinusoidal position encoding to each word vector (RTE-nopos does not)",
        "relcirc_jax/text/rte.py",
        "embedded = embedded + position_scale * sinusoidal_positions(ids.shape[-1], words.shape[-1])",
        "embedded = embedded",
        ("tests/test_rte.py::test_position_encoding_on_and_off",),
    ),
    Mutant(
        "x0_to_eps",
        "an x0-prediction model samples as diffusers' x0 ('sample') prediction type does",
        "relcirc_jax/diffusion/parameterization.py",
        "return (x_t - jnp.sqrt(abar) * out) / jnp.sqrt(1.0 - abar)",
        "return (x_t - out) / jnp.sqrt(1.0 - abar)",
        ("tests/test_parameterization.py::test_model_samples_match_diffusers_prediction_type",),
    ),
    Mutant(
        "logit_normal_std",
        "logit-normal timesteps follow their (mean, std)",
        "relcirc_jax/diffusion/losses.py",
        "u = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,)))",
        "u = jax.nn.sigmoid(mean + jax.random.normal(key, (batch,)))",
        ("tests/test_schedules_losses.py::test_logit_normal_timesteps_follow_the_logit_normal_quantiles",),
    ),
    Mutant(
        "high_noise_mixture",
        "train.high_noise mixes a high-noise logit-normal into the timesteps",
        "relcirc_jax/diffusion/losses.py",
        "return jnp.where(high, _draw_timesteps(high_key, batch, num_timesteps, (mean, std)), base)",
        "return base",
        ("tests/test_schedules_losses.py::test_high_noise_share_mixes_in_its_logit_normal_component",),
    ),
    Mutant(
        "teacher_weight",
        "a distillation target is the teacher_weight mix of the data's and the teacher's",
        "relcirc_jax/diffusion/losses.py",
        "target = (1.0 - teacher_weight) * target + teacher_weight * taught",
        "target = teacher_weight * taught",
        (
            "tests/test_schedules_losses.py::"
            "test_a_teacher_target_is_the_weighted_sum_of_both_losses_up_to_a_constant_and_passes_no_gradient",
        ),
    ),
    Mutant(
        "relation_diagonals",
        "the scene generator and evaluator name the four diagonal relations by the signs of dx and dy",
        "relcirc_jax/data/scenes.py",
        "diagonal = 4 + 2 * (~up) + (~leftward)",
        "diagonal = 4 + (~up) + 2 * (~leftward)",
        ("tests/test_scenes.py::test_relation_rule_table",),
    ),
    Mutant(
        "grad_clip",
        "AdamW steps on globally clipped gradients",
        "relcirc_jax/train/state.py",
        "return optax.chain(optax.clip_by_global_norm(t.grad_clip), adamw)",
        "return adamw",
        ("tests/test_train_step.py::test_two_steps_apply_clipped_adamw_and_the_ema_to_the_loss_gradients",),
    ),
    Mutant(
        "lr_warmup",
        "the learning rate warms up linearly over train.warmup_steps",
        "relcirc_jax/train/state.py",
        "base = optax.warmup_constant_schedule(0.0, t.lr, t.warmup_steps)",
        "base = optax.constant_schedule(t.lr)",
        ("tests/test_train_step.py::test_the_lr_warms_up_from_zero_and_the_ema_warm_up_follows_the_early_weights",),
    ),
    Mutant(
        "lr_decay",
        "train.lr_decay_fraction decays the lr linearly to 0 over the last steps",
        "relcirc_jax/train/state.py",
        "jnp.clip((num_steps - step) / decay_steps, 0.0, 1.0)",
        "jnp.clip((num_steps - step) / (2 * decay_steps), 0.0, 1.0)",
        ("tests/test_train_step.py::test_the_lr_decays_linearly_to_zero_over_the_last_fraction_of_the_steps",),
    ),
    Mutant(
        "ema_warmup",
        "train.ema_warmup makes early EMAs follow the weights",
        "relcirc_jax/train/step.py",
        "return ema.warmup_decay(step, config.train.ema_decay)",
        "return ema.warmup_decay(step + 10**9, config.train.ema_decay)",
        ("tests/test_train_step.py::test_the_lr_warms_up_from_zero_and_the_ema_warm_up_follows_the_early_weights",),
    ),
    Mutant(
        "export_bfloat16",
        "a reference model is stored as bfloat16 safetensors",
        "relcirc_jax/pretrained.py",
        "flat = {k: jnp.asarray(jax.device_get(v), jnp.bfloat16) for k, v in flatten(params).items()}",
        "flat = {k: jnp.asarray(jax.device_get(v), jnp.float32) for k, v in flatten(params).items()}",
        ("tests/test_pretrained.py::test_save_then_load_returns_the_bfloat16_rounded_params_and_config",),
    ),
    Mutant(
        "mmdit_text_key_mask",
        "an MM-DiT's padded caption tokens are masked as keys",
        "relcirc_jax/models/mmdit.py",
        "joint_mask = jnp.concatenate([key_mask.astype(bool), jnp.ones((x.shape[0], x.shape[1]), bool)], axis=1)",
        "joint_mask = jnp.ones((x.shape[0], key_mask.shape[1] + x.shape[1]), bool)",
        ("tests/test_mmdit_vs_diffusers.py::test_padded_text_tokens_get_no_attention",),
    ),
    Mutant(
        "bind_specific_first",
        "when both objects fit one description, the more specific description is bound first",
        "relcirc_jax/evaluation/scoring.py",
        "second_first = (c1 < 0) & (c2 >= 0)",
        "second_first = np.zeros_like(c1 < 0)",
        ("tests/test_evaluator.py::test_same_description_objects_and_shape_only_binding",),
    ),
    Mutant(
        "same_description_either_order",
        "identically described objects may satisfy the relation in either order",
        "relcirc_jax/evaluation/scoring.py",
        "| (same_description & (relation_index(xy[:, ::-1], size=size) == relation))",
        "",
        ("tests/test_evaluator.py::test_same_description_objects_and_shape_only_binding",),
    ),
    Mutant(
        "shared_description_binding",
        "objects that can answer both descriptions bind uniquely when exactly two match",
        "relcirc_jax/evaluation/scoring.py",
        "unique = exist & np.where(can_share, (m1 | m2).sum(1) == 2, (m1.sum(1) == 1) & (m2.sum(1) == 1))",
        "unique = exist & (m1.sum(1) == 1) & (m2.sum(1) == 1)",
        ("tests/test_evaluator.py::test_same_description_objects_and_shape_only_binding",),
    ),
    Mutant(
        "colour_left_out",
        "a colour left out of the caption matches any colour",
        "relcirc_jax/evaluation/scoring.py",
        'return valid & (obj["shape"] == shape[:, None]) & ((color[:, None] < 0) | (obj["color"] == color[:, None]))',
        'return valid & (obj["shape"] == shape[:, None]) & (obj["color"] == color[:, None])',
        ("tests/test_evaluator.py::test_same_description_objects_and_shape_only_binding",),
    ),
    Mutant(
        "loose_margin",
        "the loose relation needs each named offset beyond the paper's 5 px at 128 px",
        "relcirc_jax/evaluation/scoring.py",
        "return np.all((signs == 0) | (signs * delta > margin), axis=1)",
        "return np.all((signs == 0) | (signs * delta > 0), axis=1)",
        ("tests/test_scoring.py::test_loose_margin_is_the_papers_5_px_at_128",),
    ),
    Mutant(
        "ema_weights_for_use",
        "evaluate, sample and analyze use the EMA weights of the checkpoint",
        "relcirc_jax/train/state.py",
        "    return step, state.ema_params\n",
        "    return step, state.params\n",
        ("tests/test_main.py::test_evaluate_writes_both_detectors_tables_and_what_it_judged",),
    ),
    Mutant(
        "chosen_checkpoint",
        "--step=N evaluates, samples and analyses checkpoint N, not the latest",
        "relcirc_jax/train/state.py",
        "step, state = restore_or_fail(setup, workdir, step)",
        "step, state = restore_or_fail(setup, workdir, None)",
        ("tests/test_main.py::test_evaluate_an_earlier_step_and_a_missing_step",),
    ),
    Mutant(
        "transfer_same_shape",
        "init_transfer takes only the reference weights of the same name and shape",
        "relcirc_jax/pretrained.py",
        "if key in got and tuple(got[key].shape) == tuple(value.shape):",
        "if key in got:",
        (
            "tests/test_main.py::test_transfer_takes_each_reference_weight_of_the_same_name_and_shape_and_keeps_the_rest",
        ),
    ),
    Mutant(
        "reference_shape_check",
        "a reference model whose weights have other shapes than the config's model is refused",
        "relcirc_jax/pretrained.py",
        "        if tuple(got[key].shape) != tuple(value.shape):\n",
        "        if False:\n",
        ("tests/test_pretrained.py::test_weights_of_another_shape_under_the_same_names_are_refused_with_both_shapes",),
    ),
    Mutant(
        "resolution_same_grid",
        "a run goes on at another image size only where its position embedding spans the same grid",
        "relcirc_jax/pretrained.py",
        "if any_resolution and position_span(config) == position_span(reference):",
        "if any_resolution:",
        (
            "tests/test_pretrained.py::test_another_image_size_is_the_same_model_only_on_the_same_position_grid",
            "tests/test_train_loop.py::test_a_run_goes_on_at_another_image_size_on_the_same_position_grid",
        ),
    ),
    Mutant(
        "paper_scenes_overlap",
        "the paper's scenes may overlap however their relation is drawn (only the balanced task rejects overlaps)",
        "relcirc_jax/data/dataset.py",
        "relation_idx=relation, max_overlap=max_overlap",
        "relation_idx=relation, max_overlap=scenes.MAX_OVERLAP_FRACTION",
        (
            "tests/test_dataset.py::test_paper_task_rules_and_relation_frequencies",
            "tests/test_dataset.py::test_drawn_relations_keep_the_paper_scenes_follow_their_law_and_draw_each_layout_"
            "from_its_relations_law",
        ),
    ),
    Mutant(
        "straight_heavy_law",
        'data.relations="straight_heavy" draws each straight relation twice as often as each diagonal',
        "relcirc_jax/data/dataset.py",
        "_STRAIGHT_HEAVY_P = np.array([2, 2, 2, 2, 1, 1, 1, 1]) / 12",
        "_STRAIGHT_HEAVY_P = np.array([1, 1, 1, 1, 2, 2, 2, 2]) / 12",
        (
            "tests/test_dataset.py::test_drawn_relations_keep_the_paper_scenes_follow_their_law_and_draw_each_layout_"
            "from_its_relations_law",
        ),
    ),
    Mutant(
        "position_grid_stretch",
        "a smaller image on a larger image's position grid takes that grid's positions (diffusers' base_size)",
        "relcirc_jax/models/dit.py",
        "return max(reference // 64, 1) * self.image_size / reference",
        "return max(reference // 64, 1)",
        ("tests/test_dit_vs_diffusers.py::test_a_smaller_image_on_the_larger_images_position_grid_matches_diffusers",),
    ),
)
MUTANTS = TRAINING_MUTANTS + ANALYSIS_MUTANTS + CORE_MUTANTS


def copy_tree(destination: str) -> None:
    """The working tree's tracked and untracked-but-not-ignored files, as the tests would see them in a clone, and the
    package's built extensions (`pip install -e .` builds them in place; a clone's install would build them too)."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    files += [
        os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "relcirc_jax", "**", "*.so"), recursive=True)
    ]
    for name in filter(None, files):
        source = os.path.join(REPO, name)
        if os.path.isfile(source):
            os.makedirs(os.path.dirname(os.path.join(destination, name)), exist_ok=True)
            shutil.copy2(source, os.path.join(destination, name))


def stale_mutants(tree: str = REPO, mutants=MUTANTS) -> list[str]:
    """One line per mutant that no longer fits the code in `tree`: its snippet does not occur exactly once in its
    file, or a test it names is not defined in its test file (tests/test_mutants.py runs this in CI)."""
    problems = []
    for mutant in mutants:
        with open(os.path.join(tree, mutant.path)) as f:
            count = f.read().count(mutant.old)
        if count != 1:
            problems.append(f"Mutant {mutant.name!r}: the snippet occurs {count} times in {mutant.path}, not once.")
        for test in mutant.tests:
            path, name = test.split("::")[0], test.split("::")[-1].split("[")[0]
            with open(os.path.join(tree, path)) as f:
                if f"def {name}(" not in f.read():
                    problems.append(f"Mutant {mutant.name!r}: {path} defines no test {name}.")
    return problems


def plant(tree: str, mutant: Mutant) -> None:
    path = os.path.join(tree, mutant.path)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(mutant.old, mutant.new))


def run_tests(tree: str, tests: tuple[str, ...]) -> tuple[int, str, float]:
    """(pytest exit code, its output, seconds), importing relcirc_jax from `tree` (not the installed checkout)."""
    env = {**os.environ, "PYTHONPATH": tree}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
    )
    return result.returncode, result.stdout + result.stderr, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names (default: all of --set)")
    parser.add_argument(
        "--set", choices=("training", "analysis", "core", "all"), default="all", help="which group of mutants"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary trees")
    args = parser.parse_args()
    pool = {"training": TRAINING_MUTANTS, "analysis": ANALYSIS_MUTANTS, "core": CORE_MUTANTS, "all": MUTANTS}[args.set]
    chosen = [m for m in pool if not args.only or m.name in args.only.split(",")]
    stale = stale_mutants(REPO, chosen)  # before any test runs: a stale mutant would otherwise stop the run midway
    if stale:
        raise SystemExit("\n".join(stale) + f"\nFix: update MUTANTS in {__file__} to the current code.")
    work = tempfile.mkdtemp(prefix="relcirc_mutation_")
    baseline = os.path.join(work, "baseline")
    copy_tree(baseline)
    check = subprocess.run(
        [sys.executable, "-c", "import relcirc_jax; print(relcirc_jax.__file__)"],
        cwd=baseline,
        env={**os.environ, "PYTHONPATH": baseline},
        capture_output=True,
        text=True,
    ).stdout
    if not check.startswith(baseline):
        raise SystemExit(f"The copy imports relcirc_jax from {check.strip()}, not from {baseline}.")
    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    code, output, seconds = run_tests(baseline, tests)
    print(f"baseline (no bug planted): {len(tests)} tests, exit {code}, {seconds:.0f} s", flush=True)
    if code != 0:
        raise SystemExit(f"The unmutated tree fails its own tests; fix that first:\n{output[-3000:]}")
    results = {}
    print(f"{'mutant':20s} {'killed':6s} {'seconds':>7s}  killed by / promise")
    for mutant in chosen:
        tree = os.path.join(work, mutant.name)
        copy_tree(tree)
        plant(tree, mutant)
        code, output, seconds = run_tests(tree, mutant.tests)
        failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
        killed = code not in (0, 5)
        results[mutant.name] = {"killed": killed, "by": failed[0] if failed else None, "seconds": round(seconds)}
        print(
            f"{mutant.name:20s} {'yes' if killed else 'NO':6s} {seconds:7.0f}  "
            f"{failed[0] if failed else '(survived)'} / {mutant.promise}",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(tree)
    if not args.keep:
        shutil.rmtree(work)
    print(json.dumps(results))
    sys.exit(0 if all(r["killed"] for r in results.values()) else 1)


if __name__ == "__main__":
    main()
