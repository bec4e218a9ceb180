"""Every option that changes training has an invariant test, or a stated reason why none
applies. The list grows from the schema: a new step option (or training.* key) fails this
test until it is entered below, with its property.

Each entry names the invariant tests (module::function, in tests/invariants/) that exercise
the option, or says in words why no invariant applies.
"""

from __future__ import annotations

import importlib

from vaeflow.config import schema

SPLIT = "test_batch_splitting::test_micro_batches_give_the_batch_gradient"
ACCUM = "test_batch_splitting::test_accumulation_equals_the_large_batch"
GAN_SPLIT = "test_batch_splitting::test_micro_batches_gan_stage"
FREEZE = "test_freeze::test_frozen_parts_are_bit_identical"
AMP = "test_precision_optimizers::test_gan_steps_run"
LPIPS = "test_loss_parity::test_lpips_training_equals_evaluation"
RESUME = "test_resume_stochastic::test_kill_and_resume_is_bit_exact_with_stochastic_options"
TWO = "test_two_processes::test_two_processes_equal_one_with_an_unused_parameter"
OOM = "test_two_processes::test_out_of_memory_on_one_rank_splits_every_rank"

STEP_OPTIONS = {
    "name": "a label: names the stage's folder, changes no number",
    "n_epochs": [RESUME],
    "train_vae": [FREEZE],  # the discriminator-only path, generator wholly frozen
    "gan_training": [GAN_SPLIT, AMP, RESUME],
    "use_lpips": [LPIPS],
    "recon_type": [SPLIT, "test_batch_splitting::test_micro_batches_unit_range_losses", GAN_SPLIT],
    "focal_gamma": ["test_batch_splitting::test_micro_batches_unit_range_losses"],
    "kl_beta": [SPLIT, ACCUM],
    "kl_warmup_steps": "a function of global_step, which every split and rank shares (tests/test_losses.py checks the schedule)",
    "kl_free_bits": "not a mean over images: the floor applies to the batch-mean KL per latent dimension "
                    "(Kingma et al. 2016), so a micro-batch clamps its own mean; off by default",
    "beta_start": "the beta schedule: a function of global_step (tests/test_losses.py)",
    "beta_end": "the beta schedule: a function of global_step (tests/test_losses.py)",
    "beta_steps": "the beta schedule: a function of global_step (tests/test_losses.py)",
    "tc_weight": "not a mean over images: beta-TCVAE's minibatch-weighted-sampling estimator is defined over "
                 "the (micro-)batch it sees; off by default",
    "lambda_vq": [SPLIT, ACCUM, RESUME],
    "lambda_lpips": [LPIPS],
    "lpips_net": [LPIPS],
    "lambda_adv": [GAN_SPLIT, "test_batch_splitting::test_accumulation_gan_stage"],
    "adaptive_weight": "not a mean over images: taming's gradient-norm ratio is taken per micro-batch (2 processes "
                       "pool it over the global batch, tests/test_grad_sync.py kl_gan)",
    "adaptive_weight_max": "the clamp of adaptive_weight (see there)",
    "disc_start": [AMP],
    "gan_start": "a function of global_step, like disc_start (tests/test_nonfinite.py::test_gan_start_after_disc_start...)",
    "lambda_lecam": [GAN_SPLIT, RESUME],
    "disc_lr_mult": "a factor on the discriminator's learning rate, read once when its optimizer is built",
    "r1_gamma": [GAN_SPLIT],
    "freeze": [FREEZE],
    "unfreeze": [FREEZE],
    "optimization": [AMP],
    "transition_on": "decides when a stage ends from logged means (tests/test_trainer_modes.py)",
    "max_steps": [FREEZE, AMP],
    "cpu_threads": "performance only: intra-op threads (tests/test_stage_threads.py)",
    "grad_accum_steps": [ACCUM, "test_batch_splitting::test_accumulation_gan_stage"],
    "grad_clip": "acts on the window's averaged gradient at the optimizer step, after the splits above agree",
    "use_amp": [AMP],
    "amp_dtype": [AMP],
    "allow_microbatching": [SPLIT, OOM],
}

TRAINING = {
    "batch_size": [ACCUM],
    "workers": "data loading only: the batch a rank reads is a function of (seed, stage, epoch, batch)",
    "cpu_threads": "performance only (tests/test_stage_threads.py)",
    "device": "where the math runs; CUDA parity is checked on a GPU (tests/evaluation/test_gpu.py)",
    "perceptual_device": "where LPIPS runs (see device)",
    "disc_device": "where the discriminator runs (see device)",
    "log_every": "how often losses are logged: no training state changes",
    "save_every": [RESUME],
    "sample_every_epoch": "rank 0's grids, in eval mode: no training state changes",
    "ema_decay": [FREEZE],
    "nonfinite": "the guard: tests/test_nonfinite.py and the rollback agreement check in trainer/recovery.py",
    "distributed": [TWO, OOM],
    "pipeline": "the stages themselves: every option above",
}


def check(table: dict, keys: list[str], where: str) -> None:
    missing = [k for k in keys if k not in table]
    assert not missing, (f"{where} options without an invariant test or a reason: {missing}; add each to "
                         f"tests/invariants/test_option_coverage.py with the test that states its property")
    stale = [k for k in table if k not in keys]
    assert not stale, f"{where}: entries for options the schema no longer has: {stale}"
    for key, entry in table.items():
        if isinstance(entry, str):
            assert len(entry) > 20, f"{where}.{key}: say why no invariant applies"
            continue
        for ref in entry:
            module, func = ref.split("::")
            mod = importlib.import_module(f"invariants.{module}")
            assert callable(getattr(mod, func, None)), f"{where}.{key}: {ref} is not a test"


def test_every_step_option_has_an_invariant_or_a_reason():
    check(STEP_OPTIONS, list(schema()["$defs"]["step_options"]["properties"]), "training.pipeline step")


def test_every_training_key_has_an_invariant_or_a_reason():
    check(TRAINING, list(schema()["properties"]["training"]["properties"]), "training")


def test_a_new_option_fails_the_check():
    keys = [*STEP_OPTIONS, "new_option"]
    try:
        check(STEP_OPTIONS, keys, "step")
    except AssertionError as exc:
        assert "new_option" in str(exc)
    else:
        raise AssertionError("an option without an entry passed")
