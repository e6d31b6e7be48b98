"""The serving engine: safe image decoding, one model in memory, dynamic batching and atomic model swaps."""
