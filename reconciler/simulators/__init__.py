"""Stand-ins for the outside systems, for tests, benchmarks and the demo: a fakepve launcher
(the third-party fake Proxmox VE), the in-container agent and the Velocity bridge plugin, both
speaking the real wire contracts (each module's docstring states the contract it speaks)."""
