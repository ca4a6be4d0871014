"""A folder's scheduler config read as diffusers reads it: every option against diffusers' PyTorch schedulers on
the sampler path (the same SchedulerConfig.resolve -> sampler_grid -> sample code the pipeline runs)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_samplers import SD15, compare, inputs, nchw, run, run_diffusers

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.sampling.registry import SAMPLERS, SCHEDULE_TYPES, sampler_grid
from sd_jax.sampling.scheduler_config import SchedulerConfig
from sd_jax.sampling.scheduler_keys import ALL_KEYS, CLASS_DEFAULTS, CLASS_SAMPLERS, KEY_HANDLING

BASE = dict(SD15, timestep_spacing="leading")


def folder(cls, **kw):
    """A scheduler config as a folder would hold it (no pipeline rewrites: pipeline_class '')."""
    return SchedulerConfig.from_dict({"_class_name": cls, **BASE, **kw}, pipeline_class="")


def run_ours(cfg: SchedulerConfig, name, steps, noise, noises=None, schedule="default"):
    r = cfg.resolve(name, schedule)
    grid = sampler_grid(r.sampler, r.schedule, steps, r.options)
    fn = jax.jit(lambda n, z: run(r.sampler, r.schedule, grid, n, noises=z))
    return nchw(fn(jnp.asarray(np.moveaxis(noise, 1, -1)), jnp.asarray(np.moveaxis(noises, -3, -1))))


def reference(cls, cfg_kw, name, steps, noise, noises):
    import diffusers

    sched = getattr(diffusers, cls).from_config({**BASE, **cfg_kw})
    sched.set_timesteps(steps)
    return run_diffusers(name, None, steps, noise, noises, sched=sched)


def check(label, cls, cfg_kw, name, steps=8, seed=11, schedule="default", tol=1e-5):
    noise, noises = inputs(steps, seed)
    ref = reference(cls, cfg_kw, name, steps, noise, noises)
    compare(label, run_ours(folder(cls, **cfg_kw), name, steps, noise, noises, schedule), ref, tol)


# -- the key table --


def test_every_key_has_a_handling_and_a_sampler():
    assert ALL_KEYS <= set(KEY_HANDLING)
    assert set(CLASS_SAMPLERS.values()) <= set(SAMPLERS)
    assert SCHEDULE_TYPES == ("default", "karras", "exponential", "beta", "sgm_uniform", "simple")


@pytest.mark.live
def test_class_defaults_match_diffusers():
    import inspect

    import diffusers

    for cls, ours in CLASS_DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, cls).__init__).parameters
        theirs = {k: p.default for k, p in params.items() if k not in ("self", "kwargs")}
        theirs = {k: tuple(v) if isinstance(v, list) else v for k, v in theirs.items()}
        assert ours == theirs, cls


def test_unknown_key_is_warned_about():
    with pytest.warns(UserWarning, match="unknown key 'my_custom_knob'"):
        folder("DDIMScheduler", my_custom_knob=3)


def test_value_the_sampler_does_not_read_is_warned_about():
    cfg = folder("DDIMScheduler", use_karras_sigmas=True)
    with pytest.warns(UserWarning, match="use_karras_sigmas=True is not an option of diffusers' DDIMScheduler"):
        cfg.resolve()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.resolve("euler").options.schedule_type == "karras"  # from_config carries it to Euler


def test_steps_offset_and_clip_sample_rewrite_as_sd_pipelines():
    raw = {"_class_name": "DDIMScheduler", **SD15, "steps_offset": 0, "clip_sample": True}
    with pytest.warns(FutureWarning, match="`steps_offset` should be set to 1 instead of 0"):
        cfg = SchedulerConfig.from_dict(raw, "StableDiffusionPipeline")
    r = cfg.resolve()
    assert r.schedule.steps_offset == 1 and not r.options.clip_sample
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xl = SchedulerConfig.from_dict(raw, "StableDiffusionXLPipeline").resolve()  # SDXL does not rewrite
    assert xl.schedule.steps_offset == 0 and xl.options.clip_sample


@pytest.mark.parametrize("cls,name", sorted(CLASS_SAMPLERS.items()))
def test_default_sampler_is_the_folders_class(cls, name):
    kw = {"skip_prk_steps": True} if name == "pndm" else {}  # (diffusers' PNDM default runs PRK; refused above)
    assert folder(cls, **kw).default_sampler == name
    assert folder(cls, **kw).resolve().sampler == name


def test_default_sampler_of_sde_dpm_and_unknown_class():
    assert folder("DPMSolverMultistepScheduler", algorithm_type="sde-dpmsolver++").default_sampler == "dpmpp_2m_sde"
    with pytest.warns(UserWarning, match="KDPM2DiscreteScheduler"):
        assert folder("KDPM2DiscreteScheduler").default_sampler == "euler"


REFUSED = [
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, "solver_order=3"),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}, "algorithm_type='dpmsolver'"),
    ("DPMSolverMultistepScheduler", {"use_lu_lambdas": True}, "use_lu_lambdas=True"),
    ("DPMSolverMultistepScheduler", {"variance_type": "learned_range"}, "variance_type='learned_range'"),
    ("EulerDiscreteScheduler", {"timestep_type": "continuous"}, "timestep_type='continuous'"),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "use_beta_sigmas": True}, "use_karras_sigmas"),
    ("PNDMScheduler", {"skip_prk_steps": False}, "skip_prk_steps=False"),
    ("DDPMScheduler", {"variance_type": "learned"}, "variance_type='learned'"),
    ("UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0=False"),
    ("DDIMScheduler", {"trained_betas": [0.1] * 1000}, "trained_betas"),
    ("DDIMScheduler", {"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
]


@pytest.mark.parametrize("cls,kw,words", REFUSED)
def test_unsupported_values_are_refused_naming_the_key(cls, kw, words):
    with pytest.raises(UnsupportedArchitectureError, match=words.replace("[", r"\[")):
        folder(cls, **kw).resolve()


def test_schedule_type_refused_where_it_has_no_meaning():
    with pytest.raises(ValueError, match="schedule 'karras' is not available for sampler ddim"):
        folder("DDIMScheduler").resolve("ddim", "karras")
    with pytest.raises(ValueError, match="pass sampler='dpmpp_2m'"):
        folder("DDIMScheduler").resolve("dpmpp_2m_karras", "exponential")
    with pytest.raises(ValueError, match="unknown schedule type 'nope'"):
        folder("DDIMScheduler").resolve("euler", "nope")


def test_sgm_uniform_and_simple_follow_comfyui():
    """ComfyUI's normal_scheduler(sgm=True) and simple_scheduler on the trained table, transcribed."""
    r = folder("EulerDiscreteScheduler").resolve("euler", "sgm_uniform")
    table = r.schedule.sigmas().astype(np.float64)
    log = np.log(table)

    def sigma(t):
        lo, hi = int(np.floor(t)), int(np.ceil(t))
        return np.exp((1 - (t - lo)) * log[lo] + (t - lo) * log[hi])

    sgm = [sigma(t) for t in np.linspace(999, 0, 7 + 1)[:-1]] + [0.0]
    np.testing.assert_allclose(sampler_grid("euler", r.schedule, 7, r.options).sigmas, sgm, rtol=1e-6)
    r = folder("EulerDiscreteScheduler").resolve("euler", "simple")
    simple = [table[-(1 + int(x * 1000 / 7))] for x in range(7)] + [0.0]
    np.testing.assert_allclose(sampler_grid("euler", r.schedule, 7, r.options).sigmas, simple, rtol=1e-6)


# -- parity with diffusers on the sampler path --

THRESH = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.6}
CLASS = {name: SAMPLERS[name].diffusers_class for name in SAMPLERS}


@pytest.mark.live
@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lcm"])
def test_thresholding_matches_diffusers(name):
    kw = dict(THRESH, algorithm_type="sde-dpmsolver++") if name == "dpmpp_2m_sde" else THRESH
    check(f"{name} thresholding", CLASS[name], kw, name)


@pytest.mark.live
@pytest.mark.parametrize("name", ["ddim", "ddpm", "heun", "lcm"])
def test_clip_sample_matches_diffusers(name):
    check(f"{name} clip_sample", CLASS[name], {"clip_sample": True, "clip_sample_range": 1.2}, name)


SIGMA_SAMPLERS = ["euler", "heun", "lms", "dpmpp_2m", "dpmpp_2m_sde", "unipc"]


@pytest.mark.live
@pytest.mark.parametrize("stype", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("name", SIGMA_SAMPLERS)
def test_folder_sigma_options_match_diffusers(name, stype):
    kw = {f"use_{stype}_sigmas": True}
    if name == "dpmpp_2m_sde":
        kw["algorithm_type"] = "sde-dpmsolver++"
    check(f"{name} use_{stype}_sigmas", CLASS[name], kw, name)


@pytest.mark.live
@pytest.mark.parametrize("stype", ["karras", "exponential", "beta"])
@pytest.mark.parametrize("name", ["euler", "dpmpp_2m", "unipc"])
def test_schedule_argument_is_the_folder_option(name, stype):
    """``schedule=`` gives what diffusers gives with ``use_<type>_sigmas`` in the config."""
    noise, noises = inputs(8, 12)
    ref = reference(CLASS[name], {f"use_{stype}_sigmas": True}, name, 8, noise, noises)
    compare(f"{name} schedule={stype}", run_ours(folder(CLASS[name]), name, 8, noise, noises, stype), ref)


OPTION_CASES = {
    "euler sigma_min": ("euler", {"final_sigmas_type": "sigma_min"}),
    "euler karras sigma range": ("euler", {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}),
    "euler log_linear": ("euler", {"interpolation_type": "log_linear"}),
    "euler trailing": ("euler", {"timestep_spacing": "trailing"}),
    "dpmpp_2m sigma_min": ("dpmpp_2m", {"final_sigmas_type": "sigma_min"}),
    "dpmpp_2m karras sigma_min": ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True}),
    "dpmpp_2m no lower_order_final": ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    "dpmpp_2m euler_at_final": ("dpmpp_2m", {"final_sigmas_type": "sigma_min", "euler_at_final": True}),
    "dpmpp_2m order 1": ("dpmpp_2m", {"solver_order": 1}),
    "dpmpp_2m heun": ("dpmpp_2m", {"solver_type": "heun"}),
    "dpmpp_2m_sde heun": ("dpmpp_2m_sde", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
    "dpmpp_2m lambda_min_clipped": (
        "dpmpp_2m",
        {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "linspace"},
    ),  # fmt: skip
    "unipc sigma_min": ("unipc", {"final_sigmas_type": "sigma_min"}),
    "unipc bh1": ("unipc", {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "unipc order 1": ("unipc", {"solver_order": 1}),
    "unipc no lower_order_final": ("unipc", {"lower_order_final": False, "final_sigmas_type": "sigma_min"}),
    "unipc disable_corrector": ("unipc", {"disable_corrector": [1, 3]}),
    "ddim set_alpha_to_one": ("ddim", {"set_alpha_to_one": True}),
    "ddpm fixed_small_log": ("ddpm", {"variance_type": "fixed_small_log"}),
    "lcm original steps and scaling": ("lcm", {"original_inference_steps": 30, "timestep_scaling": 5.0}),
}


@pytest.mark.live
@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_folder_options_match_diffusers(case):
    name, kw = OPTION_CASES[case]
    check(case, CLASS[name], kw, name)


@pytest.mark.live
def test_many_steps_second_order_final_matches_diffusers():
    """16 steps and sigma_min: lower_order_final no longer applies (diffusers: only under 15 steps)."""
    check("dpmpp_2m 16 steps sigma_min", CLASS["dpmpp_2m"], {"final_sigmas_type": "sigma_min"}, "dpmpp_2m", steps=16)


@pytest.mark.live
def test_other_sampler_reads_the_folder_as_from_config():
    """sampler='euler' on a DDIM folder: EulerDiscreteScheduler.from_config(ddim config), DDIM-only keys dropped,
    Euler's own defaults for the rest."""
    import diffusers

    cfg_kw = {"use_karras_sigmas": True, "timestep_spacing": "trailing", "steps_offset": 0}
    noise, noises = inputs(8, 13)
    ddim = diffusers.DDIMScheduler.from_config({**BASE, **cfg_kw})
    sched = diffusers.EulerDiscreteScheduler.from_config(ddim.config)
    sched.set_timesteps(8)
    ref = run_diffusers("euler", None, 8, noise, noises, sched=sched)
    ours = run_ours(folder("DDIMScheduler", **cfg_kw), "euler", 8, noise, noises)
    compare("ddim folder -> euler", ours, ref)


@pytest.mark.live
@pytest.mark.parametrize("stype", ["karras", "sgm_uniform", "simple"])
def test_euler_family_schedule_types_as_custom_sigmas(stype):
    """Types diffusers has no flag for (or no flag on this class): diffusers' Euler / Euler-ancestral walking our
    sigmas and timesteps give our trajectory."""
    import diffusers
    import torch

    for name in ("euler", "euler_a"):
        r = folder(CLASS[name]).resolve(name, stype)
        grid = sampler_grid(name, r.schedule, 8, r.options)
        sched = getattr(diffusers, CLASS[name]).from_config(BASE)
        sched.set_timesteps(8)
        sched.sigmas = torch.from_numpy(grid.sigmas)
        sched.timesteps = torch.from_numpy(grid.ts[:-1])
        noise, noises = inputs(8, 14)
        ref = run_diffusers(name, None, 8, noise, noises, sched=sched)
        compare(f"{name} {stype}", run_ours(folder(CLASS[name]), name, 8, noise, noises, stype), ref)
