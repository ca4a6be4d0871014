"""Pipelines: txt2img, img2img, inpaint, denoise, upscale and interpolation around one jitted sampling loop."""
