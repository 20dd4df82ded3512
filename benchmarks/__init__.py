"""Microbenchmarks of the fused ops and of a training step; see README "Performance"."""
