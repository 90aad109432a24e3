"""Feeds for a causal LM's ONNX graph on a padded batch, numpy and onnxruntime only (export_hf.py and
verify_fixtures.py share it)."""
import numpy as np


def lm_feeds(sess, ids, mask):
    """Feeds for every input the graph declares (ids, mask: int64 numpy [batch, sequence]). Besides
    input_ids and attention_mask, exports made by Hugging Face Optimum may take position_ids (0..T-1,
    what the model computes itself without them), an empty KV cache (past_key_values.N.key/value:
    [batch, kv_heads, 0, head_dim]) and, for a merged decoder, use_cache_branch (false: the branch
    without a cache)."""
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feeds[i.name] = ids
        elif i.name == "attention_mask":
            feeds[i.name] = mask
        elif i.name == "position_ids":
            feeds[i.name] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        elif i.name.startswith("past_key_values."):
            _, heads, _, head_dim = i.shape
            dtype = np.float16 if i.type == "tensor(float16)" else np.float32
            feeds[i.name] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=dtype)
        elif i.name == "use_cache_branch":
            feeds[i.name] = np.array([False])
        else:
            raise SystemExit(f"the exported graph has an input this script cannot feed: {i.name}")
    return feeds
