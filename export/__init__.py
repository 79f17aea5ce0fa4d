"""kiln export: Hub or local models to verified ONNX packages (needs kiln-serve[export])."""
