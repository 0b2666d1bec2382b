"""Bringing an existing Proxmox estate under the controller: read it all (`estate`, and the
edge where configured: `edge`), write spec YAML for it (`writer`, `edge_writer`, `yamltext`),
and mark reviewed guests and firewall objects as owned (`adopting`). Called by the CLI's
`import` and `adopt`."""
