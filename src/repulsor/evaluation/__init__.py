"""repulsor.evaluation."""
