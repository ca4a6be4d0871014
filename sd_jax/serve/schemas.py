"""Request and response models of the A1111 API, with its field names, types and defaults.

They follow AUTOMATIC1111's ``modules/api/models.py`` (``StableDiffusionTxt2ImgProcessingAPI`` and the img2img
one, built there from its processing classes) and what the ``webuiapi`` client sends. Types and plain ranges are
checked here, so a wrong type or an out-of-range value is a 422 naming the field; limits that depend on the
server's flags (sizes, images per request) and on the model (sampler names, prompt length) are checked in
:mod:`sd_jax.serve.jobs`. Unknown fields are kept aside (``model_extra``) and logged, as A1111 ignores them.

A1111 fields sd-jax accepts without applying, because its samplers take the folder's scheduler settings:
``eta``, ``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``, ``s_min_uncond``; and the file-saving flags
(``save_images``, ``do_not_save_*``: the server never writes files). Features it does not have are refused when
asked for (``restore_faces``, ``tiling``, ``styles``, variation seeds, ``script_name``, a refiner by request).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1


class Processing(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed: int = Field(-1, ge=-1, le=MAX_SEED)
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"  # A1111's deprecated name for sampler_name, used when that is unset
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1)
    n_iter: int = Field(1, ge=1)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = Field(7.0, allow_inf_nan=False)
    width: int = Field(512, ge=8)
    height: int = Field(512, ge=8)
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(Processing):
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)  # the hires fix's second pass
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = Field(2.0, gt=0.0, le=8.0)
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = Field(0, ge=0, le=1000)
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(Processing):
    init_images: list[str] = Field(default_factory=list)
    resize_mode: int = Field(0, ge=0, le=3)
    image_cfg_scale: float | None = None
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=64)
    mask_blur_y: int = Field(4, ge=0, le=64)
    mask_blur: int | None = Field(None, ge=0, le=64)
    mask_round: bool = True
    inpainting_fill: int = Field(0, ge=0, le=3)
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = Field(0, ge=0)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class ImageResponse(BaseModel):
    """txt2img and img2img: base64 PNGs (with their infotext), the request's parameters, ``info`` as JSON text."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class PNGInfoRequest(BaseModel):
    image: str


class PNGInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


class ProgressRequest(BaseModel):
    """A1111's ``/internal/progress`` body: one task's progress (``force_task_id`` names a request's task)."""

    id_task: str
    id_live_preview: int = -1
    live_preview: bool = False
