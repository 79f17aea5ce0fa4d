"""Generation in the lean runtime: decoder sessions with a KV cache, the decoding loop, logits
processing and streaming detokenization (no torch)."""
