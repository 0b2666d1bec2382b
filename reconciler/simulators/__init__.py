"""Stand-ins for the outside systems, for tests, benchmarks and the demo: a fakepve launcher
(the third-party fake Proxmox VE), and later the agent and Velocity-bridge simulators."""
