"""Safety checker: diffusers' StableDiffusionSafetyChecker numbers and decisions, and its use in the pipeline."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data

from sd_jax.loading.diffusers import load_component
from sd_jax.models.safety_checker import SafetyChecker, flag_images, preprocess


def photos():
    imgs = [data.astronaut(), data.coffee(), data.chelsea(), (np.random.default_rng(0).random((40, 48, 3)) * 255)]
    return [np.asarray(Image.fromarray(np.asarray(i, np.uint8)).resize((48, 40)), np.float32) / 255 for i in imgs]


@pytest.mark.live
def test_matches_diffusers_safety_checker(fixtures_dir):
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    theirs = StableDiffusionSafetyChecker.from_pretrained(fixtures_dir / "sd1" / "safety_checker").eval()
    proc = CLIPImageProcessor.from_pretrained(fixtures_dir / "sd1" / "feature_extractor")
    cfg, params = load_component(fixtures_dir / "sd1", "safety_checker")
    imgs = np.stack(photos())
    pil = [Image.fromarray((i * 255).round().astype(np.uint8)) for i in imgs]
    clip_in = proc(pil, return_tensors="pt").pixel_values
    ours_in = preprocess(imgs, 32, 32)
    assert np.abs(ours_in - clip_in.numpy().transpose(0, 2, 3, 1)).max() < 1e-5
    cos_c, cos_s = SafetyChecker(cfg).apply({"params": params}, jnp.asarray(ours_in))
    with torch.no_grad():
        emb = theirs.visual_projection(theirs.vision_model(clip_in)[1])
        from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

        ref_c = cosine_distance(emb, theirs.concept_embeds).numpy()
    assert np.abs(np.asarray(cos_c) - ref_c).max() <= 1e-4
    # Thresholds between the scores make some images flagged and others not; the decisions must agree.
    w = np.median(ref_c, axis=0).astype(np.float32)
    with torch.no_grad():
        theirs.concept_embeds_weights.copy_(torch.from_numpy(w))
        theirs.special_care_embeds_weights.fill_(0.0)  # every image gets the 0.01 adjustment
    params = dict(params, concept_embeds_weights=w, special_care_embeds_weights=np.zeros(3, np.float32))
    _, ref_flags = theirs(clip_in, [i for i in imgs])
    flags = flag_images(cos_c, cos_s, params)
    assert flags.tolist() == list(ref_flags) and 0 < sum(ref_flags) < len(ref_flags) + 1


def test_pipeline_blacks_out_flagged_images(fixtures_dir):
    from sd_jax.pipelines.pipeline import StableDiffusion

    pipe = StableDiffusion.load(fixtures_dir / "sd1")
    assert pipe.safety is not None
    clean, _ = pipe.txt2img(["a cat", "a dog"], steps=2)
    assert pipe.last_nsfw.tolist() == [False, False] and clean.max() > 0
    module, params, size, crop = pipe.safety
    pipe.safety = (module, dict(params, concept_embeds_weights=jnp.full((17,), -1.0)), size, crop)
    with pytest.warns(UserWarning, match="2 image\\(s\\) flagged"):
        flagged, _ = pipe.txt2img(["a cat", "a dog"], steps=2)
    assert pipe.last_nsfw.tolist() == [True, True] and flagged.max() == 0
    pipe.safety_enabled = False
    off, _ = pipe.txt2img(["a cat", "a dog"], steps=2)
    np.testing.assert_allclose(off, clean)
