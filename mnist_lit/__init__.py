"""mnist_lit: MNIST digits -> a two-hidden-layer MLP trained with SGD, driven by the Lightning CLI."""
