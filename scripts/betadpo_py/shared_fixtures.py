"""The two tiny models of the shared fixtures (../shared/fixtures: tiny-llama-dynamo, tiny-gpt2-ts) as
transformers models holding their ONNX weights, for the scripts that reproduce or extend their goldens."""
import json
import os

import numpy as np
import onnx
import torch
from onnx import numpy_helper


def configs(d, name):
    from transformers import AutoConfig
    proto = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    if name == "tiny-llama-dynamo":
        inv = [t for t in proto.graph.initializer if t.name.endswith("inv_freq")][0]
        inv = numpy_helper.to_array(inv, base_dir=d).astype(np.float64)
        theta = float(round(inv[1] ** (-len(inv))))  # inv_freq[i] = theta^(-2i/head_dim)
        return AutoConfig.for_model(
            "llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
            tie_word_embeddings=False, rope_parameters={"rope_theta": theta, "rope_type": "default"})
    if name == "tiny-gpt2-ts":
        return AutoConfig.for_model("gpt2", vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                    bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    raise KeyError(name)


def torch_model(d, name, inits=None):
    """The shared fixture `name` (directory d) as a transformers model holding its ONNX weights, or the
    initializer values `inits` (name -> array) in their place."""
    from transformers import AutoModelForCausalLM
    ref_json = json.load(open(os.path.join(d, "golden.json")))
    model = AutoModelForCausalLM.from_config(configs(d, name), attn_implementation="eager").eval()
    if inits is None:
        proto = onnx.load(os.path.join(d, "model.onnx"))
        inits = {t.name: numpy_helper.to_array(t, base_dir=d) for t in proto.graph.initializer}
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for iname, m in ref_json["initializer_to_parameter"].items():
            a = torch.from_numpy(inits[iname].copy())
            params[m["parameter"]].copy_(a.t() if m["transposed"] else a)
    return model
