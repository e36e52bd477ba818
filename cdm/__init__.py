"""cdm: Compartmentalized Diffusion Models."""

__version__ = "0.1.0"
