"""``python -m memcompile``: every flavor's parameters and training FLOPs per token."""

from memcompile.flavors import flavor_table

print(flavor_table())
