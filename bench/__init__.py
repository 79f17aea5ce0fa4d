"""kiln bench: side-by-side measurements (never timed tests). See bench/README.md."""
