"""Applying: live runs against the outside systems, one module per job.

    connecting   endpoints -> providers: the registry (`connect_platform`); a new kind is a
                 provider written in `reconciler.providers` and registered here
    observing    every provider asked once, in the order of their `needs` -> ObservedState
    converging   observe -> plan -> apply, again after a conflict or a migration: the one
                 path of the CLI, the controller's cycles and the demo
    executor     a Plan's changes in dependency waves, per-host concurrency, dry-run as a flag
                 on the same path (retries live inside the providers)

Called by the CLI, the controller and the demo; imports planning, providers and the model.
"""
