"""repulsor.analyses."""
