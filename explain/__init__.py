"""Explain job: example galleries with Grad-CAM heat maps, where the model and images are."""
