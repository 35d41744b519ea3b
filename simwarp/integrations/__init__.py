"""Integrations with other libraries (imported on demand, each needs its optional extra).

* :mod:`simwarp.integrations.transformers` — ``"softstep"`` in transformers' attention interface.
* :mod:`simwarp.integrations.xformers` — xformers attention-bias objects as ``attn_mask``.
"""
