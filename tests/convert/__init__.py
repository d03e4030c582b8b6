"""Converter tests: a package, so that their module names (test_invpt, ...) do not collide with the decoder tests'."""
