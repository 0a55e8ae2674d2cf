"""The data side of training: which samples form each batch, and how they are read."""
