"""The long-running service, `reconciler run` (`service`): where its specs come from
(`sources`), when it does what (`timing`), which replica may act (`lease`), and what it shows
(`status`, `metrics`, `http`, `logs`). Called by the CLI's `run`; nothing below imports it."""
