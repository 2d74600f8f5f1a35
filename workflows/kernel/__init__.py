"""The kernel in parts, composed by `workflows.procedure.Procedure`: common (requests, stops), steps (and
undo), gates, controls (pause/resume/abort/override), rules (the worker's inventory, start checks), ui."""
