"""repulsor.report."""
