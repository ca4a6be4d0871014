"""CLIP text encoders: parity with transformers on the fixtures, pooling rules, causal mask, sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.loading.diffusers import load_component
from sd_jax.models import clip
from sd_jax.models.clip import CLIPTextConfig, CLIPTextModel

ENCODERS = [("sd1", "text_encoder"), ("sd2", "text_encoder"), ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2")]


@pytest.mark.parametrize("variant,sub", ENCODERS)
def test_text_encoder_matches_transformers(variant, sub, fixtures_dir):
    ref = np.load(fixtures_dir / "reference" / f"{variant}.npz")
    cfg, params = load_component(fixtures_dir / variant, sub)
    out = jax.jit(CLIPTextModel(cfg).apply)({"params": params}, ref[f"{sub}/input_ids"])
    got = {
        "last_hidden_state": out.last_hidden_state,
        "penultimate": out.hidden_states[-2],
        "pooler_output": out.pooler_output,
        "text_embeds": out.text_embeds,
    }
    for name, value in got.items():
        if f"{sub}/{name}" in ref:
            err = float(np.abs(np.asarray(value) - ref[f"{sub}/{name}"]).max())
            print(f"{variant}/{sub} {name}: max abs err {err:.2e}")
            assert err <= 1e-4


def test_full_size_parameter_counts():
    count = lambda c: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(clip.abstract_params(c)))  # noqa: E731
    assert count(CLIPTextConfig.sd15()) == 123_060_480
    assert count(CLIPTextConfig.sd21()) == 340_387_840
    assert count(CLIPTextConfig.sdxl_g()) == 694_659_840


def test_causal_and_pooling_rules():
    cfg = CLIPTextConfig.tiny(eos_token_id=1113)
    params = clip.init_params(cfg, jax.random.key(0))
    model = CLIPTextModel(cfg)
    ids = np.full((2, 77), 1113, np.int32)
    ids[:, 0], ids[0, 1:4], ids[1, 1:6] = 1112, [5, 6, 7], [5, 6, 7, 8, 9]
    a = model.apply({"params": params}, ids)
    ids2 = ids.copy()
    ids2[0, 3] = 99
    b = model.apply({"params": params}, ids2)
    # A later token never changes earlier states (causal), but does change its own.
    np.testing.assert_array_equal(a.last_hidden_state[0, :3], b.last_hidden_state[0, :3])
    assert float(jnp.abs(a.last_hidden_state[0, 3] - b.last_hidden_state[0, 3]).max()) > 1e-4
    # Pooling at the first EOS (positions 4 and 6).
    np.testing.assert_array_equal(a.pooler_output[0], a.last_hidden_state[0, 4])
    np.testing.assert_array_equal(a.pooler_output[1], a.last_hidden_state[1, 6])
    # Legacy configs (eos_token_id == 2) pool at the largest id instead.
    legacy = CLIPTextModel(CLIPTextConfig.tiny(eos_token_id=2)).apply({"params": params}, ids2)
    np.testing.assert_array_equal(legacy.pooler_output[0], legacy.last_hidden_state[0, 4])


@pytest.mark.live
@pytest.mark.parametrize("projection", [False, True])
def test_live_against_transformers_legacy_eos(projection):
    import torch
    import transformers

    from sd_jax.convert.diffusers import load_torch_state_dict, to_torch_state_dict

    torch.manual_seed(0)
    tcfg = transformers.CLIPTextConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=24,
        eos_token_id=2,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    theirs = cls(tcfg).eval()
    cfg_dict = {**tcfg.to_dict(), "architectures": [cls.__name__]}
    cfg = CLIPTextConfig.from_diffusers_config(cfg_dict)
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    from sd_jax.loading.registry import MODELS

    state = MODELS[cls.__name__].normalize_keys(state)
    params = load_torch_state_dict(state, clip.abstract_params(cfg))
    ids = torch.randint(0, 299, (3, 16))
    with torch.no_grad():
        ref = theirs(ids, output_hidden_states=True)
    ours = CLIPTextModel(cfg).apply({"params": params}, ids.numpy())
    pairs = [(ours.last_hidden_state, ref.last_hidden_state), (ours.hidden_states[-2], ref.hidden_states[-2])]
    pairs.append((ours.text_embeds, ref.text_embeds) if projection else (ours.pooler_output, ref.pooler_output))
    for a, b in pairs:
        assert np.abs(np.asarray(a) - b.numpy()).max() <= 1e-4
    # Export: our names load strictly back into transformers.
    back = {k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(params).items()}
    fresh = cls(tcfg)
    if not any(k.startswith("text_model.") for k in fresh.state_dict()):  # transformers 5 CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    fresh.load_state_dict(back, strict=True)
    assert CLIPTextConfig.from_diffusers_config(cfg.to_diffusers_config()) == cfg
