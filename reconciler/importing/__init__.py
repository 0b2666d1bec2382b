"""Bringing an existing Proxmox estate under the controller: read it all (`estate`), write spec
YAML for it (`writer`), and mark reviewed guests and firewall objects as owned (`adopting`).
Called by the CLI's `import` and `adopt`."""
