"""A1111 infotext (sd_jax.infotext): quoting as A1111's infotext_utils.quote, parsing as its
parse_generation_parameters, on infotexts written by hand in the formats A1111 writes; the sampler and
schedule-type tables both ways."""

import pytest

from sd_jax import infotext as it
from sd_jax.sampling.registry import SAMPLERS, SCHEDULE_TYPES

# A1111 1.9+ with hires fix, LoRAs, a textual inversion and a multi-line negative prompt
HIRES = """masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.7>
Negative prompt: lowres, bad anatomy
easynegative
Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, Size: 512x768, \
Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, \
Hires steps: 15, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54, more_details: 3b8aa1d351ef", \
TI hashes: "easynegative: c74b4e810b03", Version: v1.9.4"""

# pre-1.9: no Schedule type, the schedule folded into the sampler name; a multi-line prompt, no negative prompt
OLD = """a photo of a cat
sitting on a mat, 35mm
Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"""

# sd-webui-controlnet's unit, a quoted value with an escaped quote and a colon, a key equal to its value
CONTROL = """a house
Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 5, Seed: 7, Size: 768x512, \
Model hash: e6e99610c4, Model: sdxl_base, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], \
Weight: 1.0, Resize Mode: Crop and Resize, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, \
Control Mode: Balanced", Note: "say \\"hi\\": now", Tiling, Version: v1.10.1"""


def test_a1111_hires_lora_ti_infotext_parses():
    f = it.parse_infotext(HIRES)
    assert f["Prompt"] == "masterpiece, best quality, 1girl, (blue eyes:1.2), <lora:add_detail:0.7>"
    assert f["Negative prompt"] == "lowres, bad anatomy\neasynegative"
    assert (f["Steps"], f["Sampler"], f["Schedule type"], f["CFG scale"], f["Seed"]) == (
        "28", "DPM++ 2M", "Karras", "7", "1234567890")  # fmt: skip
    assert it.size(f) == (512, 768) and f["Model hash"] == "6ce0161689" and f["Clip skip"] == "2"
    assert (f["Hires upscale"], f["Hires steps"], f["Hires upscaler"]) == ("2", "15", "Latent")
    assert it.parse_hashes(f["Lora hashes"]) == {"add_detail": "7c6bad76eb54", "more_details": "3b8aa1d351ef"}
    assert it.parse_hashes(f["TI hashes"]) == {"easynegative": "c74b4e810b03"}
    assert f["Version"] == "v1.9.4" and len(f) == 18
    # what civitai reads: a Steps line with Seed, CFG scale, Sampler and Model hash
    assert {"Steps", "Seed", "CFG scale", "Sampler", "Model hash"} <= set(f)


def test_old_infotext_multiline_prompt_no_negative_and_folded_schedule():
    f = it.parse_infotext(OLD)
    assert f["Prompt"] == "a photo of a cat\nsitting on a mat, 35mm" and f["Negative prompt"] == ""
    assert "Schedule type" not in f and it.sampler_from_a1111(f["Sampler"]) == ("dpmpp_2m", "karras")
    assert f["Model hash"] == "45dee52b" and f["CFG scale"] == "7.5"


def test_controlnet_unit_quotes_escapes_and_bare_keys():
    f = it.parse_infotext(CONTROL)
    unit = f["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1.0")
    assert unit.endswith("Control Mode: Balanced") and f["Note"] == 'say "hi": now'
    assert f["Version"] == "v1.10.1" and "Tiling" not in f  # a bare key (value == key) has no pair to match


def test_a_prompt_alone_is_a_prompt():
    f = it.parse_infotext("just a prompt, with: a colon\nand a second line")
    assert f == {"Prompt": "just a prompt, with: a colon\nand a second line", "Negative prompt": ""}


def test_quote_as_a1111():
    assert it.quote("DPM++ 2M") == "DPM++ 2M" and it.quote(7.0) == "7" and it.quote(0.45) == "0.45"
    assert it.quote("a: b") == '"a: b"' and it.quote("a, b") == '"a, b"' and it.quote("a\nb") == '"a\\nb"'
    assert it.quote('é "x", y') == '"é \\"x\\", y"'  # json.dumps(ensure_ascii=False)
    assert it.unquote('"a, \\"b\\""') == 'a, "b"' and it.unquote('"broken') == '"broken'


def test_format_orders_keys_quotes_and_round_trips():
    params = {"Version": "sd-jax 0.1.0", "Seed": 3, "Lora hashes": "a: 1234, b: 5678", "Steps": 2, "Odd": None,
              "Model": "my:model,v2", "Sampler": "Euler a", "CFG scale": 7.5, "Size": "64x32", "Batch size": 2,
              "Schedule type": "Karras", "Tiling": "Tiling", "Note": "line one\nline two"}  # fmt: skip
    text = it.format_infotext("a cat\non a mat", "", params)
    lines = text.split("\n")
    assert lines[:2] == ["a cat", "on a mat"] and "Negative prompt" not in text  # left out when empty
    assert lines[2] == ('Steps: 2, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.5, Seed: 3, Size: 64x32, '
                        'Model: "my:model,v2", Tiling, Lora hashes: "a: 1234, b: 5678", Batch size: 2, '
                        'Note: "line one\\nline two", Version: sd-jax 0.1.0')  # fmt: skip
    back = it.parse_infotext(it.format_infotext("p", "neg, x", params))
    assert back["Negative prompt"] == "neg, x" and back["Model"] == "my:model,v2"
    assert back["Note"] == "line one\nline two"
    assert back["Lora hashes"] == "a: 1234, b: 5678" and back["CFG scale"] == "7.5" and "Odd" not in back
    with pytest.raises(it.InfotextError, match="'1bad,key'"):
        it.format_infotext("p", None, {"1bad,key": 1, "Steps": 1, "Seed": 1})


def test_every_sampler_and_schedule_type_maps_both_ways():
    for name in SAMPLERS:
        a1111 = it.sampler_to_a1111(name)
        ours, implied = it.sampler_from_a1111(a1111)
        assert ours == name.removesuffix("_karras") and implied is None
    assert it.schedule_to_a1111("default", "dpmpp_2m_karras") == "Karras"
    assert {it.sampler_to_a1111(n) for n in ("euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms", "ddim", "pndm",
                                             "heun", "lcm")} == {"Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC",
                                                                 "LMS", "DDIM", "PLMS", "Heun", "LCM"}  # fmt: skip
    for s in SCHEDULE_TYPES:
        assert it.schedule_from_a1111(it.schedule_to_a1111(s)) == s
    assert it.schedule_to_a1111("default") == "Automatic" and it.schedule_from_a1111("SGMUniform") == "sgm_uniform"
    assert it.sampler_from_a1111("k_euler_a") == ("euler_a", None)


@pytest.mark.parametrize(("call", "words"), [
    (lambda: it.sampler_from_a1111("DPM2 a"), "'DPM2 a' is an A1111 sampler sd-jax does not have"),
    (lambda: it.sampler_from_a1111("Wibble"), "'Wibble' is not a sampler sd-jax knows"),
    (lambda: it.schedule_from_a1111("Align Your Steps"), "A1111 schedule type sd-jax does not have"),
])  # fmt: skip
def test_unknown_names_are_named(call, words):
    with pytest.raises(it.InfotextError, match=words):
        call()
