"""repulsor.plots."""
