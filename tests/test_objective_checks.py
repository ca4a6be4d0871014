"""An objective refuses a ``config.train`` that names components the model does not have, naming them."""

import ml_collections
import pytest

from sd_jax.training.trainers.base import Objective
from sd_jax.training.trainers.controlnet import ControlNet


def _cfg(train):
    return ml_collections.ConfigDict({"train": train})


def test_training_a_component_the_model_lacks_is_refused():
    params = {"unet": {}, "vae": {}, "text_encoder": {}}
    assert Objective(_cfg(("unet",)), None, params).trained == ("unet",)
    with pytest.raises(ValueError, match=r"config.train names \['text_encoder_2'\], but this model has only"):
        Objective(_cfg(("unet", "text_encoder_2")), None, params)


def test_a_controlnet_run_trains_the_controlnet_only():
    with pytest.raises(ValueError, match=r"train must be \('controlnet',\), got \('unet',\)"):
        ControlNet(_cfg(("unet",)), None, {"unet": {}})
