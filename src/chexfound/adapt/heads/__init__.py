"""Heads over `get_intermediate_layers(x, n, return_class_token=True)` features."""
