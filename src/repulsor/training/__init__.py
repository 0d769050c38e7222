"""repulsor.training."""
