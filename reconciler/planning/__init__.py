"""Pair desired with observed by address, normalize both sides, diff, and make a Plan."""
