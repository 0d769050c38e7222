"""repulsor.store."""
