"""kiln serve: gRPC server over kiln packages (KServe v2 / Triton-compatible and typed kiln.v1)."""
