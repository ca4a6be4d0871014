"""CLIP text encoders: parity with transformers (fixtures and live), pooling rules, causal mask, sizes, configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sd_jax.errors import UnsupportedArchitectureError
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
    assert count(CLIPTextConfig.sd15()) == 123_060_480  # transformers CLIPTextModel, position_ids aside
    assert count(CLIPTextConfig.sd21()) == 340_387_840
    assert count(CLIPTextConfig.sdxl_g()) == 694_659_840
    tree = clip.abstract_params(CLIPTextConfig.sdxl_g())
    assert tree["text_projection"]["kernel"].shape == (1280, 1280)
    assert tree["text_model"]["encoder"]["layers_31"]["self_attn"]["q_proj"]["kernel"].shape == (1280, 1280)


def test_causal_and_pooling_rules():
    cfg = CLIPTextConfig.tiny(eos_token_id=1113)
    params = clip.init_params(cfg, jax.random.key(0))
    model = CLIPTextModel(cfg)
    ids = np.full((2, 77), 1113, np.int32)
    ids[:, 0], ids[0, 1:4], ids[1, 1:6] = 1112, [5, 6, 7], [5, 6, 7, 8, 9]
    a = model.apply({"params": params}, ids)
    assert a.last_hidden_state.shape == (2, 77, 32) and a.pooler_output.shape == (2, 32) and a.text_embeds is None
    assert len(a.hidden_states) == cfg.num_hidden_layers + 1
    ids2 = ids.copy()
    ids2[0, 3] = 99
    b = model.apply({"params": params}, ids2)
    # A later token never changes earlier states (causal), but does change its own.
    np.testing.assert_array_equal(a.last_hidden_state[0, :3], b.last_hidden_state[0, :3])
    assert float(jnp.abs(a.last_hidden_state[0, 3] - b.last_hidden_state[0, 3]).max()) > 1e-4
    # Pooling at the first EOS (positions 4 and 6).
    np.testing.assert_array_equal(a.pooler_output[0], a.last_hidden_state[0, 4])
    np.testing.assert_array_equal(a.pooler_output[1], a.last_hidden_state[1, 6])
    # Legacy configs (eos_token_id == 2) pool at the largest id instead: first 1113 at 4 here, 1112 elsewhere.
    legacy = CLIPTextModel(CLIPTextConfig.tiny(eos_token_id=2)).apply({"params": params}, ids2)
    np.testing.assert_array_equal(legacy.pooler_output[0], legacy.last_hidden_state[0, 4])
    ids3 = ids2.copy()
    ids3[0, 2] = 1113  # an earlier 1113: the legacy rule moves there, the new rule follows eos_token_id=99
    legacy = CLIPTextModel(CLIPTextConfig.tiny(eos_token_id=2)).apply({"params": params}, ids3)
    np.testing.assert_array_equal(legacy.pooler_output[0], legacy.last_hidden_state[0, 2])
    new_rule = CLIPTextModel(CLIPTextConfig.tiny(eos_token_id=99)).apply({"params": params}, ids3)
    np.testing.assert_array_equal(new_rule.pooler_output[0], new_rule.last_hidden_state[0, 3])


def test_clip_skip_stops_early_and_padding_mask_hides_keys():
    cfg = CLIPTextConfig.tiny(max_position_embeddings=8)
    params = clip.init_params(cfg, jax.random.key(1))
    ids = np.array([[1112, 5, 6, 1113, 1113, 1113, 1113, 1113]], np.int32)
    full = CLIPTextModel(cfg).apply({"params": params}, ids)
    skip = CLIPTextModel(cfg, num_layers=2).apply({"params": params}, ids)
    assert len(skip.hidden_states) == 3
    np.testing.assert_allclose(skip.hidden_states[-1], full.hidden_states[-2], atol=1e-6)
    assert float(jnp.abs(skip.last_hidden_state - full.last_hidden_state).max()) > 1e-3
    # With a padding mask, the states of real tokens ignore what stands in the padding.
    mask = np.array([[1, 1, 1, 1, 0, 0, 0, 0]])
    other = ids.copy()
    other[0, 4:] = 7
    m1 = CLIPTextModel(cfg).apply({"params": params}, ids, mask)
    m2 = CLIPTextModel(cfg).apply({"params": params}, other, mask)
    np.testing.assert_array_equal(m1.last_hidden_state[0, :4], m2.last_hidden_state[0, :4])


def test_config_round_trip_and_clear_errors():
    for cfg in (CLIPTextConfig.sd15(), CLIPTextConfig.sd21(), CLIPTextConfig.sdxl_g(), CLIPTextConfig.tiny()):
        assert CLIPTextConfig.from_diffusers_config(json.loads(json.dumps(cfg.to_diffusers_config()))) == cfg
    base = CLIPTextConfig.sd21().to_diffusers_config()
    with pytest.raises(UnsupportedArchitectureError, match="hidden_act='relu'"):
        CLIPTextConfig.from_diffusers_config({**base, "hidden_act": "relu"})
    with pytest.raises(UnsupportedArchitectureError, match="architectures='CLIPModel'"):
        CLIPTextConfig.from_diffusers_config({**base, "architectures": ["CLIPModel"]})
    with pytest.raises(UnsupportedArchitectureError, match="model_type='clip'"):
        CLIPTextConfig.from_diffusers_config({**base, "model_type": "clip"})
    tiny = CLIPTextConfig.tiny()
    ids = jnp.zeros((1, tiny.max_position_embeddings + 1), jnp.int32)
    with pytest.raises(ValueError, match=rf"{tiny.max_position_embeddings + 1} tokens.*max_position_embeddings="):
        jax.eval_shape(lambda: CLIPTextModel(tiny).init(jax.random.key(0), ids))


# --------------------------------------------------------------------------- live parity with transformers

LIVE = {
    # name: (class, hidden_act, vocab, hidden, eos_token_id)
    "legacy_eos2": ("CLIPTextModel", "quick_gelu", 300, 32, 2),
    "eos49407": ("CLIPTextModel", "quick_gelu", 49408, 16, 49407),
    "projection_gelu": ("CLIPTextModelWithProjection", "gelu", 300, 32, 7),
}


def _live_ids(rng, vocab, eos, n=3, t=16):
    """BOS, random tokens (some above EOS when EOS is small), EOS, then padding; EOS at varying positions."""
    ids = rng.integers(3, min(vocab, 299), (n, t))
    for b in range(n):
        end = 4 + 5 * b
        ids[b, end] = eos
        ids[b, end + 1 :] = 0 if b % 2 else eos  # SD 2 ("!") and SD 1 (EOS) padding
    ids[:, 0] = 1
    return ids


@pytest.mark.live
@pytest.mark.parametrize("case", list(LIVE))
def test_live_against_transformers(case, tmp_path):
    import safetensors.numpy
    import torch
    import transformers

    from sd_jax.convert.diffusers import load_torch_state_dict, to_torch_state_dict

    arch, act, vocab, hidden, eos = LIVE[case]
    projection = arch == "CLIPTextModelWithProjection"
    cfg = CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act=act,
        projection_dim=24 if projection else None,
        bos_token_id=1,
        eos_token_id=eos,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    tcfg = transformers.CLIPTextConfig(
        **{k: v for k, v in cfg.__dict__.items() if k != "projection_dim"},
        projection_dim=24,
        architectures=[arch],
    )
    cls = getattr(transformers, arch)
    theirs = cls(tcfg).eval()
    assert CLIPTextConfig.from_diffusers_config(theirs.config.to_dict()) == cfg
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    state = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v for k, v in state.items()}
    params = load_torch_state_dict(state, clip.abstract_params(cfg))

    ids = _live_ids(np.random.default_rng(0), vocab, eos)
    mask = (np.arange(16)[None] <= np.array([4, 9, 14])[:, None]).astype(np.int64)
    mask[1, 2] = 0  # a hole before EOS, so the padding mask changes real tokens' states too
    tmodel = theirs.text_model if projection else theirs
    model = CLIPTextModel(cfg)
    unmasked, masked = (model.apply({"params": params}, ids, m).last_hidden_state for m in (None, mask))
    assert float(jnp.abs(unmasked - masked)[1, 3:10].max()) > 1e-3
    for attention_mask in (None, mask):
        t_mask = None if attention_mask is None else torch.from_numpy(attention_mask)
        with torch.no_grad():
            ref = theirs(torch.from_numpy(ids), attention_mask=t_mask, output_hidden_states=True)
            ref_pooled = tmodel(torch.from_numpy(ids), attention_mask=t_mask).pooler_output
        ours = model.apply({"params": params}, ids, attention_mask)
        assert len(ours.hidden_states) == len(ref.hidden_states) == 4
        pairs = {
            "last_hidden_state": (ours.last_hidden_state, ref.last_hidden_state),
            "hidden_states[-2]": (ours.hidden_states[-2], ref.hidden_states[-2]),
            "hidden_states[0]": (ours.hidden_states[0], ref.hidden_states[0]),
            "pooler_output": (ours.pooler_output, ref_pooled),
        }
        if projection:
            pairs["text_embeds"] = (ours.text_embeds, ref.text_embeds)
        for name, (a, b) in pairs.items():
            err = float(np.abs(np.asarray(a) - b.numpy()).max())
            print(f"{case} mask={attention_mask is not None} {name}: max abs err {err:.2e}")
            assert err <= 1e-4, name

    # Export: our names load strictly back into transformers ...
    back = {k: torch.from_numpy(np.array(v)) for k, v in to_torch_state_dict(params).items()}
    fresh = cls(tcfg)
    if not any(k.startswith("text_model.") for k in fresh.state_dict()):  # transformers 5 CLIPTextModel
        back = {k.removeprefix("text_model."): v for k, v in back.items()}
    missing, unexpected = fresh.load_state_dict(back, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing)
    # ... and our config.json + weights load with from_pretrained and give our outputs.
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_diffusers_config()))
    safetensors.numpy.save_file(to_torch_state_dict(params), str(tmp_path / "model.safetensors"))
    loaded = cls.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        again = loaded(torch.from_numpy(ids)).last_hidden_state.numpy()
    err = float(np.abs(np.asarray(model.apply({"params": params}, ids).last_hidden_state) - again).max())
    print(f"{case} from_pretrained(to_diffusers_config) last_hidden_state: max abs err {err:.2e}")
    assert err <= 1e-4
