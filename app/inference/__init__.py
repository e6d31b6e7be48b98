"""The serving engine: safe image decoding, one model in memory, dynamic batching and atomic model swaps.

- `app.inference.images`: `decode_image`, `ImageLimits`, `sha256_hex` and the `ImageError` problem types.
- `app.inference.served`: `ServedModel` (the immutable bundle), `Prediction` (+ `.decide`), `load_served_model`.
- `app.inference.engine`: `InferenceEngine`, `EngineConfig`, `ModelUnavailable`, `QueueFull`.
- `app.inference.metrics`: Prometheus collectors (`InferenceMetrics`, `default_metrics`).
- `app.inference.bench`: raw pipeline figures for `rxverify bench service`.

Submodules are not re-exported here, so that importing the image checks does not import torch.
"""
