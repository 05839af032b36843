"""Federated staged training on Flower: each hospital a client holding only its own rows,
only the trainable groups' tensors on the wire (see sharing, site, simulation)."""
