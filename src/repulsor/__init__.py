"""repulsor: deep repulsive prototypes for adversarial robustness, and an evaluation a defence cannot fool."""

__version__ = "0.1.0"
