"""The `skd` commands, each run in the driver process where the user typed it: the CLI (`cli`) and what each
command does (`distill`, `teachers`, `serving`, `compare`, `cache_build`, `export`, `speed`). Commands build
on the driver's run machinery (`orchestrator.driver`); nothing below imports them.
"""
