"""Scoring a model on examples: the loss the loop trains and validates with, divergence from the base, greedy
answers and their checking. It sits before the training loop in the chain (model -> adapters -> data -> scoring
-> train), so the loop validates with the very functions `desktune eval` reports, and neither imports the other.
"""
