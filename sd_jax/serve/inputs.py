"""The image inputs of a request, decoded and checked before it is queued: img2img's init images and mask, the
hires fix's options, and ControlNet units in the sd-webui-controlnet extension's ``alwayson_scripts`` format.

Inpainting as A1111 does it: the mask (white = repaint; ``inpainting_mask_invert=1`` flips it) is blurred by
``mask_blur`` (a Gaussian of that radius, A1111's default 4), fitted to the size, and repaints with
``denoising_strength`` from the original image; the original pixels are pasted back outside the mask (A1111's
overlay). ``inpainting_fill`` picks what the masked area starts from (0 fill, 1 original, 2 latent noise, 3 latent
nothing: :mod:`sd_jax.pipelines.masked_content`). ``inpaint_full_res`` (A1111's "Only masked", its API default)
samples only the mask's box (grown by ``inpaint_full_res_padding`` and to the width:height aspect) at
width x height, then pastes it back into the image at its own size.
"""

from __future__ import annotations

from sd_jax.pipelines import images as I
from sd_jax.pipelines import masked_content as MC
from sd_jax.serve.fields import FieldError, Limits

RESIZE = {0: "resize", 1: "crop", 2: "resize", 3: "resize"}  # A1111: just resize, crop and resize, fill, latent


def img2img_inputs(pipe, req, limits: Limits) -> dict:
    from PIL import ImageFilter, ImageOps

    from sd_jax.serve.fields import decode_image

    if not req.init_images:
        raise FieldError("init_images", "init_images is empty ; img2img needs at least one base64 image")
    size = (req.width, req.height)
    mode = RESIZE[req.resize_mode]
    decoded = [decode_image(t, f"init_images.{i}", limits) for i, t in enumerate(req.init_images)]
    if not req.mask:
        return {"images": [I.load_image(img, size, mode) for img in decoded]}
    mask = decode_image(req.mask, "mask", limits).convert("L")
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur = req.mask_blur if req.mask_blur is not None else max(req.mask_blur_x, req.mask_blur_y)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    out = {"mask_blur": blur, "masked_content": MC.FROM_A1111[req.inpainting_fill]}
    if not req.inpaint_full_res:
        out.update(images=[I.load_image(img, size, mode) for img in decoded], mask=I.load_mask(mask, size, mode))
        return out
    # "Only masked": the images at the first one's own size, the mask fitted to it; sample the box at width x height
    whole = decoded[0].size
    originals = [I.load_image(img, None if img.size == whole else whole) for img in decoded]
    full_mask = I.load_mask(mask, None if mask.size == whole else whole)
    box = MC.crop_box(full_mask[..., 0], req.inpaint_full_res_padding, req.width, req.height)
    x0, y0, x1, y1 = box
    out.update(images=[I.resize_array(o[y0:y1, x0:x1], size) for o in originals],
               mask=I.resize_array(full_mask[y0:y1, x0:x1], size), full_res={"box": box, "images": originals,
               "mask": full_mask, "padding": req.inpaint_full_res_padding})  # fmt: skip
    return out


def hires_inputs(req) -> dict:
    from sd_jax.pipelines.hires import get_upscaler

    try:
        upscaler = get_upscaler(req.hr_upscaler or "Latent")
    except ValueError as e:
        raise FieldError("hr_upscaler", str(e)) from None
    for name in ("hr_checkpoint_name", "hr_sampler_name", "hr_scheduler"):
        if getattr(req, name) not in ("", None, "Use same checkpoint", "Use same sampler", "Use same scheduler"):
            raise FieldError(name, f"{name} is not supported by the server's hires fix ; leave it unset")
    for name in ("hr_prompt", "hr_negative_prompt"):
        value = getattr(req, name)
        same = req.prompt if name == "hr_prompt" else req.negative_prompt
        if value and value != same:
            raise FieldError(name, f"a separate {name} is not supported by the server's hires fix ; leave it empty")
    sized = req.hr_resize_x or req.hr_resize_y
    return dict(scale=None if sized else req.hr_scale, hires_width=req.hr_resize_x or None,
                hires_height=req.hr_resize_y or None, hires_steps=req.hr_second_pass_steps,
                denoise=0.7 if req.denoising_strength is None else req.denoising_strength,
                upscaler=upscaler)  # fmt: skip


def control_inputs(script: dict, nets: dict, limits: Limits) -> dict:
    """The extension's ``{"args": [unit, ...]}``: each enabled unit's ``model`` names a ControlNet the server
    loaded (``--controlnet``), ``image`` its map (``module`` "canny" runs the edge detector, "none" takes the map
    as is), ``weight``, ``guidance_start``/``guidance_end`` and ``control_mode`` ("ControlNet is more important":
    guess mode, for every unit)."""
    from sd_jax.control_image import canny
    from sd_jax.serve.fields import decode_image

    units = script.get("args") if isinstance(script, dict) else None
    if not isinstance(units, list):
        raise FieldError("alwayson_scripts.ControlNet", 'ControlNet takes {"args": [unit, ...]}')
    picked = []
    for i, u in enumerate(units):
        where = f"alwayson_scripts.ControlNet.args.{i}"
        if not isinstance(u, dict):
            raise FieldError(where, f"{where} is not a ControlNet unit object")
        if not u.get("enabled", True) or u.get("model") in (None, "", "None"):
            continue
        if u["model"] not in nets:
            known = ", ".join(nets) or "none (start the server with --controlnet PATH)"
            raise FieldError(f"{where}.model", f"ControlNet {u['model']!r} is not loaded ; loaded: {known}")
        module = str(u.get("module", "none")).lower()
        if module not in ("none", "canny"):
            raise FieldError(f"{where}.module", f"preprocessor {module!r} is not available ; use none or canny")
        img = I.load_image(decode_image(u.get("image") or "", f"{where}.image", limits))
        if module == "canny":
            img = canny(img, float(u.get("threshold_a", 100)), float(u.get("threshold_b", 200)))
        try:
            weight, start, end = float(u.get("weight", 1.0)), float(u.get("guidance_start", 0.0)), float(
                u.get("guidance_end", 1.0))  # fmt: skip
        except (TypeError, ValueError):
            raise FieldError(where, f"{where}: weight/guidance_start/guidance_end must be numbers") from None
        picked.append((u["model"], img, weight, start, end, u.get("control_mode") in (2, "ControlNet is more "
                                                                                        "important")))  # fmt: skip
    if not picked:
        return {}
    order = list(nets)
    if [p[0] for p in picked] != [m for m in order if m in {p[0] for p in picked}] or len(picked) != len(order):
        raise FieldError("alwayson_scripts.ControlNet", f"send one unit per loaded ControlNet, in order: "
                                                        f"{', '.join(order)}")  # fmt: skip
    return {"control": dict(control_image=[p[1] for p in picked], controlnet_conditioning_scale=[p[2] for p in picked],
                            control_guidance_start=[p[3] for p in picked], control_guidance_end=[p[4] for p in picked],
                            guess_mode=any(p[5] for p in picked))}  # fmt: skip
