"""Design-rule policies: each rule written once, run on either of two inputs.

A platform opts into design rules in its spec's `policies` section. The rules live here and know
nothing of files, positions or plans; two adapters feed them and word what they find:

    spec ----------> spec_firewall --+
                                     +--> reach (isolation, agent port) --> Reach: Opening, Finding
    observed state -> live_firewall -+
    spec ----------------------------------> design (the spec-only rules) --> Finding

    loading.policies             findings -> error diagnostics at the spec's file:line
    planning.observed_policies   openings -> plan warnings naming the live object to fix

Layering: this package sits above `reconciler.model` and below `reconciler.loading` and
`reconciler.providers`, and imports only the model and the standard library (an import-linter
contract in pyproject.toml holds it there). So a finding carries a neutral `Place` (a spec path,
or a live object's address and a path inside it), and the adapter that has the positions or the
plan turns it into a diagnostic.

    reachability    who can reach a guest: a pure evaluator of Proxmox firewall chains
    findings        Place, Finding and the phrases both adapters word findings with
    inbound         a guest's inbound chain in neutral terms; rules compiled from Proxmox fields
    spec_firewall   the spec's firewall as that input
    live_firewall   the observed firewall as that input
    reach           the isolation and agent-port rules, over either input
    design          the rules only the spec answers: layer dependencies, placement, Traefik
                    domains, Velocity host, vmid ranges
"""
