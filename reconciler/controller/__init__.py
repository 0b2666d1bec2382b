"""The long-running service (issue 6): triggers, leader lease, cycle, status, health and
metrics. Empty today; the layer is declared in the import contracts so nothing below it may
import it."""
