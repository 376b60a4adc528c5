"""The frozen generator: model loading (embedded defaults), batched generation, the input builder."""
