"""A folder's ``scheduler/scheduler_config.json``, read as diffusers reads it.

* The folder's own scheduler (``_class_name``) and its options are the default sampler
  (:attr:`SchedulerConfig.default_sampler`), as ``StableDiffusionPipeline.from_pretrained`` builds it.
* The SD 1/2 pipelines (``StableDiffusionPipeline``, ``...Img2Img...``, ``...Inpaint...``) rewrite
  ``steps_offset`` to 1 and ``clip_sample: true`` to false, with diffusers' deprecation warnings.
* Another sampler reads the same config as ``OtherScheduler.from_config(pipe.scheduler.config)``: each key the
  other diffusers class has takes the folder's value, the rest that class's defaults. Keys the pipeline filled
  in from defaults (diffusers' ``_use_default_values``) are not carried over.
* Every key is honoured, or named in a warning (unknown keys; a value that the chosen sampler's class does not
  read), or refused with an error naming it (``scheduler_keys.KEY_HANDLING`` says which).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from sd_jax.errors import UnsupportedArchitectureError
from sd_jax.sampling.scheduler_keys import ALL_KEYS, CLASS_DEFAULTS, CLASS_SAMPLERS, SAMPLER_CLASSES, SCHEDULE_ALIASES
from sd_jax.schedules import NoiseSchedule

SCHEDULE_TYPES = ("default", "karras", "exponential", "beta", "sgm_uniform", "simple")
# samplers that walk integer timesteps with their own rules: only their diffusers grid
FIXED_GRID = ("ddim", "ddpm", "pndm", "lcm")
# pipelines whose __init__ rewrites steps_offset / clip_sample (diffusers' SD 1/2 pipelines)
REWRITING_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")

STEPS_OFFSET_WARNING = (
    "The configuration file of this scheduler: {cls} is outdated. `steps_offset` should be set to 1 instead of {v}. "
    "Please make sure to update the config accordingly as leaving `steps_offset` might led to incorrect results in "
    "future versions (diffusers' StableDiffusionPipeline rewrites it to 1, and so do we): {src}"
)
CLIP_SAMPLE_WARNING = (
    "The configuration file of this scheduler: {cls} has not set the configuration `clip_sample`. `clip_sample` "
    "should be set to False in the configuration file (diffusers' StableDiffusionPipeline rewrites it to False, and "
    "so do we): {src}"
)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """A sampler's options from the scheduler config (static: part of the compiled loop's key)."""

    schedule_type: str = "default"
    final_sigmas_type: str = "zero"
    interpolation_type: str = "linear"
    sigma_min: float | None = None
    sigma_max: float | None = None
    solver_order: int = 2
    lower_order_final: bool = True
    euler_at_final: bool = False
    solver_type: str = "midpoint"
    lambda_min_clipped: float = -float("inf")
    disable_corrector: tuple = ()
    thresholding: bool = False
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0


@dataclasses.dataclass(frozen=True)
class Resolved:
    """What a sampler runs with: its name, the trained/timestep schedule and its options."""

    sampler: str
    schedule: NoiseSchedule
    options: SamplerOptions


def _freeze(v):
    return tuple(v) if isinstance(v, list) else v


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The folder's scheduler config after the pipeline's rewrites; :meth:`resolve` gives any sampler's view."""

    class_name: str
    present: tuple  # ((key, value), ...) as in the file, after the rewrites
    defaulted: frozenset = frozenset()  # keys the rewrites set although the file lacked them
    source: str = "scheduler_config.json"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any], pipeline_class: str = "StableDiffusionPipeline", *,
                  source: str = "scheduler_config.json") -> SchedulerConfig:  # fmt: skip
        """Read a ``scheduler_config.json`` dict; warn about unknown keys and apply the pipeline's rewrites."""
        class_name = str(cfg.get("_class_name", "EulerDiscreteScheduler"))
        present = {k: _freeze(v) for k, v in cfg.items() if not k.startswith("_")}
        for k in sorted(set(present) - ALL_KEYS):
            warnings.warn(f"{source}: unknown key {k!r} (no diffusers scheduler we match reads it); ignored",
                          stacklevel=3)  # fmt: skip
        if class_name not in CLASS_DEFAULTS:
            warnings.warn(
                f"{source}: _class_name={class_name!r} has no matching sampler here; the default sampler is euler "
                f"(pass sampler= one of {', '.join(sorted(SAMPLER_CLASSES))})",
                stacklevel=3,
            )
        defaults = CLASS_DEFAULTS.get(class_name, {})
        defaulted = set()
        if pipeline_class in REWRITING_PIPELINES:
            view = {**defaults, **present}
            if "steps_offset" in view and view["steps_offset"] != 1:
                warnings.warn(STEPS_OFFSET_WARNING.format(cls=class_name, v=view["steps_offset"], src=source),
                              FutureWarning, stacklevel=3)  # fmt: skip
                defaulted |= {"steps_offset"} - set(present)
                present["steps_offset"] = 1
            if view.get("clip_sample", False) is True:
                warnings.warn(CLIP_SAMPLE_WARNING.format(cls=class_name, src=source), FutureWarning, stacklevel=3)
                defaulted |= {"clip_sample"} - set(present)
                present["clip_sample"] = False
        return cls(class_name, tuple(sorted(present.items())), frozenset(defaulted), source)

    @property
    def default_sampler(self) -> str:
        """Our sampler for the folder's ``_class_name`` (DPMSolverMultistep: by its ``algorithm_type``)."""
        name = CLASS_SAMPLERS.get(self.class_name, "euler")
        if name == "dpmpp_2m" and dict(self.present).get("algorithm_type") == "sde-dpmsolver++":
            return "dpmpp_2m_sde"
        return name

    def default_schedule(self) -> NoiseSchedule:
        """The trained schedule as the folder's own scheduler reads it (errors only for an unusable one)."""
        return schedule_from_view(self.view(self.default_sampler), self.source)

    def view(self, sampler: str) -> dict:
        """The config the diffusers class of ``sampler`` sees (``from_config`` semantics, see the module doc)."""
        cls = SAMPLER_CLASSES[sampler]
        present = dict(self.present)
        if cls != self.class_name:
            present = {k: v for k, v in present.items() if k not in self.defaulted}
        return {k: present.get(k, d) for k, d in CLASS_DEFAULTS[cls].items()}

    def resolve(self, sampler: str | None = None, schedule: str = "default") -> Resolved:
        """The sampler (None: the folder's own), its schedule and options; errors name the key at fault.

        An alias (``SCHEDULE_ALIASES``: dpmpp_2m_karras) resolves to its sampler with the alias's schedule type.
        """
        name = self.default_sampler if sampler is None else sampler
        if name not in SAMPLER_CLASSES:
            raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SAMPLER_CLASSES))}")
        cfg = self.view(name)
        self._warn_unread(name, cfg)
        trained = schedule_from_view(cfg, self.source)
        options = options_from_view(name, cfg, schedule, self.source)
        base = SCHEDULE_ALIASES[name][0] if name in SCHEDULE_ALIASES else name
        return Resolved(base, trained, options)

    def _warn_unread(self, name: str, cfg: dict) -> None:
        for k, v in self.present:
            if k in cfg or k not in ALL_KEYS:
                continue
            if all(v != d.get(k) for d in CLASS_DEFAULTS.values() if k in d):
                warnings.warn(
                    f"{self.source}: {k}={v!r} is not an option of diffusers' {SAMPLER_CLASSES[name]} (sampler "
                    f"{name}); ignored, as diffusers does",
                    stacklevel=4,
                )


def schedule_from_view(cfg: dict, source: str = "scheduler_config.json") -> NoiseSchedule:
    """The :class:`NoiseSchedule` of a class's config view (its trained betas, spacing, offset)."""
    fields = {f.name for f in dataclasses.fields(NoiseSchedule)}
    kw = {k: v for k, v in cfg.items() if k in fields}
    kw.setdefault("set_alpha_to_one", False)
    try:
        return NoiseSchedule.from_diffusers_config({**kw, "trained_betas": cfg.get("trained_betas")})
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(f"{source}: {e}") from None


def _refuse(source, key, value, why):
    raise UnsupportedArchitectureError(f"{source}: {key}={value!r} is not supported ({why}); {_FIX}")


_FIX = "edit scheduler_config.json or pass another sampler"


def options_from_view(name: str, cfg: dict, schedule: str = "default", source: str = "scheduler_config.json"):
    """:class:`SamplerOptions` for sampler ``name`` from its class's config view, with schedule type ``schedule``."""
    if schedule not in SCHEDULE_TYPES:
        raise ValueError(f"unknown schedule type {schedule!r}; choose from {', '.join(SCHEDULE_TYPES)}")
    flags = [t for t in ("karras", "exponential", "beta") if cfg.get(f"use_{t}_sigmas")]
    if len(flags) > 1:
        keys = ", ".join(f"use_{t}_sigmas" for t in flags)
        raise UnsupportedArchitectureError(f"{source}: only one of {keys} may be true (as diffusers); {_FIX}")
    if name in SCHEDULE_ALIASES:
        base, fixed = SCHEDULE_ALIASES[name]
        if schedule not in ("default", fixed):
            raise ValueError(
                f"sampler {name} is {base} with schedule {fixed!r}; for schedule {schedule!r} pass sampler={base!r}"
            )
        schedule = fixed
    stype = schedule if schedule != "default" else (flags[0] if flags else "default")
    if stype != "default" and name in FIXED_GRID:
        raise ValueError(
            f"schedule {stype!r} is not available for sampler {name} (diffusers' {SAMPLER_CLASSES[name]} walks its "
            "own integer timesteps); use schedule='default' or one of euler, euler_a, heun, lms, dpmpp_2m, "
            "dpmpp_2m_sde, unipc"
        )
    _check_unsupported(name, cfg, source)
    kw = {f.name: cfg[f.name] for f in dataclasses.fields(SamplerOptions) if f.name in cfg}
    kw["schedule_type"] = stype
    for key in ("sigma_min", "sigma_max"):
        if kw.get(key) is not None:
            kw[key] = float(kw[key])
    if "disable_corrector" in kw:
        kw["disable_corrector"] = tuple(int(i) for i in kw["disable_corrector"] or ())
    return SamplerOptions(**kw)


def _check_unsupported(name: str, cfg: dict, source: str) -> None:
    """Refuse the values we do not implement, naming the key (see ``KEY_HANDLING``)."""
    get = cfg.get
    if get("timestep_spacing") not in ("leading", "trailing", "linspace"):
        _refuse(source, "timestep_spacing", get("timestep_spacing"), "leading, trailing or linspace")
    if get("timestep_type", "discrete") != "discrete":
        _refuse(source, "timestep_type", get("timestep_type"), "only discrete timesteps")
    for key in ("use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
        if get(key):
            _refuse(source, key, get(key), "not implemented here")
    for key in ("solver_p", "shift_terminal"):
        if get(key) is not None:
            _refuse(source, key, get(key), "not implemented here")
    if not get("predict_x0", True):
        _refuse(source, "predict_x0", False, "UniPC here predicts x0 (bh2/bh1 with predict_x0=True)")
    if get("solver_order", 2) not in (1, 2):
        _refuse(source, "solver_order", get("solver_order"), "orders 1 and 2 only")
    algo = get("algorithm_type")
    if algo is not None and algo not in ("dpmsolver++", "sde-dpmsolver++"):
        _refuse(source, "algorithm_type", algo, "dpmpp_2m is dpmsolver++ and dpmpp_2m_sde sde-dpmsolver++")
    if name.startswith("dpmpp") and get("solver_type") not in ("midpoint", "heun"):
        _refuse(source, "solver_type", get("solver_type"), "midpoint or heun")
    if name == "unipc" and get("solver_type") not in ("bh1", "bh2"):
        _refuse(source, "solver_type", get("solver_type"), "bh1 or bh2")
    vt = get("variance_type", "absent")
    if name.startswith("dpmpp") and vt is not None:
        _refuse(source, "variance_type", vt, "a model with learned variance channels")
    if name == "ddpm" and vt not in ("fixed_small", "fixed_small_log"):
        _refuse(source, "variance_type", vt, "ddpm here is fixed_small / fixed_small_log")
    if name == "pndm" and not get("skip_prk_steps"):
        _refuse(source, "skip_prk_steps", get("skip_prk_steps"), "the PRK warm-up is not implemented; set it to "
                "true for PLMS from the first step")  # fmt: skip
    if get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
        _refuse(source, "final_sigmas_type", get("final_sigmas_type"), "zero or sigma_min")
    if get("interpolation_type", "linear") not in ("linear", "log_linear"):
        _refuse(source, "interpolation_type", get("interpolation_type"), "linear or log_linear")
