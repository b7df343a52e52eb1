"""Entry points: thin scripts that turn Hydra configs into library objects and run them."""
