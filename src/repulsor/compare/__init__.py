"""repulsor.compare."""
