"""Bringing an existing Proxmox estate under the controller: read it all (`estate`, and the
edge where configured: `edge`), write spec YAML for it (`writer`, `edge_writer`, `yamltext`),
merge such specs into a platform's own (`merging`), and mark reviewed guests and firewall
objects as owned (`adopting`). Called by the CLI's `import`, `merge` and `adopt`."""
