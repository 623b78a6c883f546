"""Official Alpha-VL/ConvMAE checkpoints (``.pth``).

Their parameter names are openmae's ConvMAE / ConvViT names (``patch_embed1..4``, ``blocks1..3``,
``stage1_output_decode``, ``decoder_*``), so nothing is renamed: the state dict loads into
``create_model("convmae_base_patch16")`` (pretraining files) or ``convvit_base_patch16``
(fine-tuning files) as it is.
"""

from __future__ import annotations

import os

from torch import Tensor

from openmae.interop.weights import safe_torch_load


def load_official_convmae(path: str | os.PathLike) -> dict[str, Tensor]:
    """The state dict of an official ConvMAE ``.pth`` file, ready for ``load_state_dict``.

    Accepts ``{'model': state_dict, ...}`` (pretraining and fine-tuning checkpoints, the training ones
    with ``optimizer``, ``epoch``, ``scaler`` and an argparse ``args`` too) or a bare state dict.
    Nothing is unpickled beyond tensors, plain containers and ``argparse.Namespace``
    (:func:`openmae.interop.detect.safe_torch_load`).
    """
    obj = safe_torch_load(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither a state dict nor {{'model': state_dict}}")
    return dict(state)
