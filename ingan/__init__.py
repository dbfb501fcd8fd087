"""InGAN: train a GAN on one image, then retarget it to any size in one forward pass."""

__version__ = "0.1.0"
