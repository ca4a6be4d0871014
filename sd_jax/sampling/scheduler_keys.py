"""The config keys of the 10 diffusers scheduler classes our 12 samplers match, with diffusers' defaults, and
what we do with each key.

``CLASS_DEFAULTS`` is ``inspect.signature(cls.__init__)`` of diffusers 0.42 (the live test
``test_class_defaults_match_diffusers`` holds it to the installed diffusers). A key missing from a folder's
``scheduler_config.json`` takes the default of the class that reads it, as ``from_config`` does.
"""

from __future__ import annotations

INF = float("inf")

_TRAIN = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
_THRESH = {"thresholding": False, "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}
_SIGMAS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

CLASS_DEFAULTS: dict[str, dict] = {
    "DDIMScheduler": {
        **_TRAIN, "trained_betas": None, "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
        "prediction_type": "epsilon", **_THRESH, "clip_sample_range": 1.0, "timestep_spacing": "leading",
        "rescale_betas_zero_snr": False,
    },
    "DDPMScheduler": {
        **_TRAIN, "trained_betas": None, "variance_type": "fixed_small", "clip_sample": True,
        "prediction_type": "epsilon", **_THRESH, "clip_sample_range": 1.0, "timestep_spacing": "leading",
        "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    "PNDMScheduler": {
        **_TRAIN, "trained_betas": None, "skip_prk_steps": False, "set_alpha_to_one": False,
        "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
    },
    "EulerDiscreteScheduler": {
        **_TRAIN, "trained_betas": None, "prediction_type": "epsilon", "interpolation_type": "linear", **_SIGMAS,
        "sigma_min": None, "sigma_max": None, "timestep_spacing": "linspace", "timestep_type": "discrete",
        "steps_offset": 0, "rescale_betas_zero_snr": False, "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {
        **_TRAIN, "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "linspace",
        "steps_offset": 0, "rescale_betas_zero_snr": False,
    },
    "HeunDiscreteScheduler": {
        **_TRAIN, "beta_start": 0.00085, "beta_end": 0.012, "trained_betas": None, "prediction_type": "epsilon",
        **_SIGMAS, "clip_sample": False, "clip_sample_range": 1.0, "timestep_spacing": "linspace", "steps_offset": 0,
    },
    "LMSDiscreteScheduler": {
        **_TRAIN, "trained_betas": None, **_SIGMAS, "prediction_type": "epsilon", "timestep_spacing": "linspace",
        "steps_offset": 0,
    },
    "DPMSolverMultistepScheduler": {
        **_TRAIN, "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", **_THRESH,
        "algorithm_type": "dpmsolver++", "solver_type": "midpoint", "lower_order_final": True,
        "euler_at_final": False, **_SIGMAS, "use_lu_lambdas": False, "use_flow_sigmas": False, "flow_shift": 1.0,
        "final_sigmas_type": "zero", "lambda_min_clipped": -INF, "variance_type": None,
        "timestep_spacing": "linspace", "steps_offset": 0, "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential",
    },
    "UniPCMultistepScheduler": {
        **_TRAIN, "trained_betas": None, "solver_order": 2, "prediction_type": "epsilon", **_THRESH,
        "predict_x0": True, "solver_type": "bh2", "lower_order_final": True, "disable_corrector": (),
        "solver_p": None, **_SIGMAS, "use_flow_sigmas": False, "flow_shift": 1.0, "timestep_spacing": "linspace",
        "steps_offset": 0, "final_sigmas_type": "zero", "rescale_betas_zero_snr": False,
        "use_dynamic_shifting": False, "time_shift_type": "exponential", "sigma_min": None, "sigma_max": None,
        "shift_terminal": None,
    },
    "LCMScheduler": {
        **_TRAIN, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
        "original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0, "set_alpha_to_one": True,
        "steps_offset": 0, "prediction_type": "epsilon", **_THRESH, "timestep_spacing": "leading",
        "timestep_scaling": 10.0, "rescale_betas_zero_snr": False,
    },
}  # fmt: skip

# What happens with each key (every key of CLASS_DEFAULTS is here; the test checks it).
KEY_HANDLING: dict[str, str] = {
    "num_train_timesteps": "honoured (the trained schedule)",
    "beta_start": "honoured",
    "beta_end": "honoured",
    "beta_schedule": "honoured: linear, scaled_linear, squaredcos_cap_v2; anything else is an error",
    "trained_betas": "error when not null",
    "prediction_type": "honoured: epsilon, v_prediction, sample; anything else is an error",
    "timestep_spacing": "honoured: leading, trailing, linspace",
    "steps_offset": "honoured; the SD 1/2 pipelines rewrite 0 to 1 with diffusers' deprecation warning",
    "rescale_betas_zero_snr": "honoured (error for heun, lms, pndm, whose diffusers classes lack it)",
    "set_alpha_to_one": "honoured (ddim, pndm, lcm: the final alpha_bar)",
    "clip_sample": "honoured on the x0 prediction (ddim, ddpm, heun, lcm); the SD 1/2 pipelines rewrite True to "
    "False with diffusers' deprecation warning",
    "clip_sample_range": "honoured with clip_sample",
    "thresholding": "honoured: dynamic thresholding of the x0 prediction (ddim, ddpm, dpmpp_2m*, unipc, lcm)",
    "dynamic_thresholding_ratio": "honoured with thresholding",
    "sample_max_value": "honoured with thresholding",
    "variance_type": "ddpm: fixed_small / fixed_small_log honoured, others an error; dpmpp: only null",
    "skip_prk_steps": "honoured: True is PLMS from the first step; False (the PRK warm-up) is an error",
    "interpolation_type": "honoured (euler): linear, log_linear",
    "use_karras_sigmas": "honoured: schedule type karras",
    "use_exponential_sigmas": "honoured: schedule type exponential",
    "use_beta_sigmas": "honoured: schedule type beta (alpha = beta = 0.6)",
    "sigma_min": "honoured (euler, unipc): the low end of karras/exponential/beta sigmas",
    "sigma_max": "honoured (euler, unipc): the high end of karras/exponential/beta sigmas",
    "timestep_type": "only discrete; continuous is an error",
    "final_sigmas_type": "honoured: zero, sigma_min",
    "solver_order": "honoured: 1 or 2; 3 is an error",
    "algorithm_type": "selects dpmpp_2m (dpmsolver++) or dpmpp_2m_sde (sde-dpmsolver++); dpmsolver and "
    "sde-dpmsolver are an error",
    "solver_type": "honoured: midpoint / heun (dpmpp_2m*), bh1 / bh2 (unipc)",
    "lower_order_final": "honoured",
    "euler_at_final": "honoured",
    "use_lu_lambdas": "error when true",
    "use_flow_sigmas": "error when true",
    "flow_shift": "ignored unless use_flow_sigmas (an error)",
    "lambda_min_clipped": "honoured (the last DPM-Solver timestep)",
    "use_dynamic_shifting": "error when true",
    "time_shift_type": "ignored unless use_dynamic_shifting (an error)",
    "predict_x0": "only true; false is an error",
    "disable_corrector": "honoured (steps whose UniC corrector is skipped)",
    "solver_p": "error when set",
    "shift_terminal": "error when set",
    "original_inference_steps": "honoured (lcm)",
    "timestep_scaling": "honoured (lcm)",
}

# diffusers class -> our sampler (DPMSolverMultistep: by its algorithm_type, see scheduler_config).
CLASS_SAMPLERS = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "PNDMScheduler": "pndm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "LMSDiscreteScheduler": "lms",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
}

# sampler names that are another sampler with a fixed schedule type (A1111's "DPM++ 2M Karras")
SCHEDULE_ALIASES = {"dpmpp_2m_karras": ("dpmpp_2m", "karras")}

# our sampler -> the diffusers class whose config keys it reads
SAMPLER_CLASSES = {
    **{v: k for k, v in CLASS_SAMPLERS.items()},
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
}
SAMPLER_CLASSES.update({alias: SAMPLER_CLASSES[name] for alias, (name, _) in SCHEDULE_ALIASES.items()})

ALL_KEYS = frozenset(k for d in CLASS_DEFAULTS.values() for k in d)
