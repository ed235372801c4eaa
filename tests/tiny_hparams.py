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
# cDDPM at 32 px: ResNet-10 at 1/8 width without the max pool (stride 16: a 2 x 2 SparK grid).
CDDPM_TINY = {
    **DDPM_TINY,
    "encoder": "resnet10",
    "encoder_widen_factor": 0.125,
    "encoder_max_pool": False,
    "spark_settings": {"decoder_width": 16},
}
CDDPM_NOSSL_TINY = {k: v for k, v in CDDPM_TINY.items() if k != "spark_settings"}
DAE_TINY = {"channels": (8, 16, 16), "norm_num_groups": 4}
PDDPM_TINY = {**DDPM_TINY, "patch_size": 16}
ANODDPM_TINY = {
    "channels": (8, 16),
    "attention_levels": (False, False),
    "num_res_blocks": 1,
    "num_heads": 1,
    "norm_num_groups": 8,
    "test_timestep": 4,
    "ema_decay": 0.5,
}
VAE_TINY = {"image_size": 32, "channels": (8, 16), "latent_size": 8}
# Chains cut to every 100th timestep: 2 + 1 UNet evaluations per slice.
AUTODDPM_TINY = {
    "channels": (8, 16),
    "attention_levels": (False, True),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "inference_steps": 10,
    "recon_timestep": 100,
    "inpaint_timestep": 100,
    "resample_steps": 1,
}
WOLLEB_TINY = {
    "image_size": 32,
    "channels": (8, 16),
    "attention_levels": (False, True),
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "classifier_channels": (8, 16),
    "classifier_attention_levels": (False, True),
    "classifier_num_res_blocks": 1,
    "classifier_num_head_channels": 8,
    "classifier_norm_num_groups": 8,
    "ddim_steps": 2,
    # The trained UNet scores (tests swap or probe it); tests/test_ema_methods.py checks EMA.
    "ema_decay": None,
}
CFG_TINY = {
    "channels": (8, 16),
    "attention_levels": (False, False),
    "num_res_blocks": 1,
    "num_head_channels": 8,
    "norm_num_groups": 8,
    "num_inference_steps": 5,
    "ema_decay": None,  # as WOLLEB_TINY
}
TINY_HPARAMS: dict[str, dict] = {
    "ae": AE_TINY,
    "ddpm": DDPM_TINY,
    "autoddpm": AUTODDPM_TINY,
    "cddpm": CDDPM_TINY,
    "cddpm_nossl": CDDPM_NOSSL_TINY,
    "dae": DAE_TINY,
    "pddpm": PDDPM_TINY,
    "anoddpm": ANODDPM_TINY,
    "vae": VAE_TINY,
    "wolleb": WOLLEB_TINY,
    "intensity": {},
    "anofpdm": {**CFG_TINY, "t_max": 400},
    "ddib": {**CFG_TINY, "encode_timestep": 400},
    # tests/toy_methods.py
    "toy_two_stage": {},
    "toy_weak": {},
}
