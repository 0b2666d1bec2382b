"""reconciler: a declarative reconciliation controller for Proxmox VE hosting platforms.

Data flows one way (see README): specs are loaded and checked into a desired graph,
outside systems are observed into an observed state, the two are paired by address
and diffed into a Plan, and the Plan is applied in dependency waves.
"""

__version__ = "0.1.0"
