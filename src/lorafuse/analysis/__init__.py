"""Analyses of a library: mode connectivity of two experts, expert selection."""
