"""Weight formats: how a layer stores, loads and multiplies its weight (vLLM's LinearMethod shape).

How a new format plugs in: write a `LinearMethod` (base.py) in its own module: `create_weights`
makes the layer's storage, `load_rows` takes a dense tensor or a `QuantizedTensor` (raw GGML blocks,
one byte string per row, so fused q/k/v and gate/up shards and tensor-parallel splits are row or
block slices) into given rows, `process_after_loading` repacks once the weights are final, `apply`
multiplies and `embed` looks rows up. Then add one chooser to `METHOD_CHOOSERS` in registry.py, in
front of the generic ones: it sees each layer's `WeightSpec` (format, GGML types of its tensors, role,
device, dtype) and returns the method or None. Model files never change: every linear, the token
embedding and the LM head ask their method. A tied LM head shares its embedding's method and storage.
"""
