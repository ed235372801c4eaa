"""Tiny hyperparameters per registered method, shared by the method, training and scoring
tests (32 px inputs, a few thousand parameters). A new method adds its entry here: every
registered method must have one (``test_every_method_has_tiny_hparams``), so no method
slips past the contract test."""

AE_TINY = {"channels": (8, 16), "strides": (2, 2), "num_res_units": 0}
DDPM_TINY = {
    "channels": (8, 16),
    "attention_levels": (False, False),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
}
DAE_TINY = {"channels": (8, 16, 16), "norm_num_groups": 4}
VAE_TINY = {"image_size": 32, "channels": (8, 16), "latent_size": 8}
CFG_TINY = {
    "channels": (8, 16),
    "attention_levels": (False, False),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "num_inference_steps": 5,
}
TINY_HPARAMS: dict[str, dict] = {
    "ae": AE_TINY,
    "ddpm": DDPM_TINY,
    "dae": DAE_TINY,
    "vae": VAE_TINY,
    "intensity": {},
    "anofpdm": {**CFG_TINY, "t_max": 400},
    "ddib": {**CFG_TINY, "encode_timestep": 400},
    # tests/toy_methods.py
    "toy_two_stage": {},
    "toy_weak": {},
}
