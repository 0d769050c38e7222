"""Attacks on logits models: one norm geometry shared by all of them."""
