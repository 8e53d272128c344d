"""serve_tp: tensor-parallel causal LM serving on Ray Serve + DeepSpeed."""
