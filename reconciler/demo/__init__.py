"""`reconciler demo`: the example platform converged on a lab of fakes and real parts started on
this machine (`lab`), then broken the way production breaks and healed (`script`).

The CLI calls `script.cmd_demo_live`; the tests call it too, with a temporary state directory.
"""
