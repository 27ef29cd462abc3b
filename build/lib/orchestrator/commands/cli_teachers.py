"""`skd teachers`: prepare the teacher ensemble (fine-tune, evaluate, write the manifest) and serve it as a
long-lived, elastic pool on a running cluster (`serve`, `status`, `add`, `remove`, `stop`).
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from actors.errors import SkdError
from orchestrator.commands.options import AddressOpt, ConfigOpt, OptConfig, PoolOpt, SetOpt, console, fail
from orchestrator.config.load import load_config


teachers_app = typer.Typer(help="Prepare the teacher ensemble; serve it as a long-lived, elastic pool.",
                           no_args_is_help=True)


@teachers_app.command("prepare")
def teachers_prepare(config: ConfigOpt, set_: SetOpt = None,
                     force: Annotated[bool, typer.Option(help="Retrain teachers already in the manifest.")] = False):
    """Fine-tune every teacher in `teachers.members`, evaluate on dev, and write the teachers manifest
    (one MLflow run per teacher). Teachers already prepared are reused."""
    from orchestrator.commands.teachers import prepare_teachers

    try:
        cfg = load_config(config, set_)
        teachers = prepare_teachers(cfg, force=force)
    except SkdError as exc:
        fail(exc)
    table = Table(title=f"teachers for {cfg.task} ({cfg.manifest_path()})")
    for col in ("name", "family", "layers", "hidden", "parameters", "GFLOPs/token", f"dev {teachers[0].metric}",
                "checkpoint"):
        table.add_column(col)
    for t in teachers:
        table.add_row(t.name, t.family or "-", str(t.num_layers), str(t.hidden_size), f"{t.parameters / 1e6:.1f}M",
                      f"{t.flops_per_token / 1e9:.3f}" if t.flops_per_token else "-", f"{t.dev_metric:.4f}",
                      t.checkpoint)
    console.print(table)


def print_pools(pools: list[dict]) -> None:
    """One table per served pool: each teacher's node, device, requests, examples, queue, compute seconds."""
    if not pools:
        console.print("no teacher pools serve on this cluster")
    for p in pools:
        table = Table(title=f"teacher pool {p['pool']} (version {p['version']}; "
                            f"{p['settings']['task']}, {p['settings']['slots']} slot(s) per teacher)")
        for col in ("teacher", "node", "device", "requests", "examples", "queued", "running", "compute s", "status"):
            table.add_column(col)
        for t in p["teachers"]:
            table.add_row(t["name"], t.get("node", "-"), t.get("device", "-"), str(t.get("requests", "-")),
                          str(t.get("examples", "-")), str(t.get("queued", "-")), str(t.get("running", "-")),
                          f"{t['compute_s']:.1f}" if "compute_s" in t else "-", t["status"])
        console.print(table)
        changes = "; ".join(f"v{h['version']} {h['change']}" for h in p["history"][-5:])
        console.print(f"changes: {changes}", highlight=False)


@teachers_app.command("serve")
def teachers_serve(config: ConfigOpt, set_: SetOpt = None, name: PoolOpt = None):
    """Start the config's prepared teachers as a named pool of detached actors on the running cluster
    (ray.address) and return; jobs with `teachers.pool: NAME` share it until `skd teachers stop`."""
    from orchestrator.commands.serving import serve

    try:
        print_pools([serve(load_config(config, set_), name)])
    except SkdError as exc:
        fail(exc)


@teachers_app.command("status")
def teachers_status(config: OptConfig = None, name: PoolOpt = None, address: AddressOpt = None):
    """List the served pools (or one): each teacher's node, device, requests served and queue."""
    from orchestrator.commands.serving import connect, status

    try:
        cfg = load_config(config) if config else None
        with connect(cfg, address):
            print_pools(status(name or (cfg.teachers.pool if cfg else None)))
    except SkdError as exc:
        fail(exc)


@teachers_app.command("add")
def teachers_add(config: ConfigOpt, teacher: Annotated[list[str], typer.Argument(help="Teachers of the config to add.")],
                 set_: SetOpt = None, name: PoolOpt = None):
    """Start prepared teachers of the config and add them to a served pool; attached students ask them from
    their next step on (the sampling distribution gives them their share)."""
    from orchestrator.commands.serving import add

    try:
        print_pools([add(load_config(config, set_), list(teacher), name)])
    except SkdError as exc:
        fail(exc)


@teachers_app.command("remove")
def teachers_remove(teacher: Annotated[list[str], typer.Argument(help="Teachers to remove.")],
                    config: OptConfig = None, name: PoolOpt = None, address: AddressOpt = None,
                    drain_s: Annotated[float, typer.Option(help="Seconds to keep serving requests already sent.")] = 10.0):
    """Take teachers out of a served pool; attached students stop asking them at their next step and their
    mass is spread over the rest; the actors stop after --drain-s seconds."""
    from orchestrator.commands.serving import connect, remove

    try:
        cfg = load_config(config) if config else None
        with connect(cfg, address):
            print_pools([remove(cfg, list(teacher), name, drain_s)])
    except SkdError as exc:
        fail(exc)


@teachers_app.command("stop")
def teachers_stop(config: OptConfig = None, name: PoolOpt = None, address: AddressOpt = None):
    """Stop a served pool: its teacher actors, placement group and directory."""
    from orchestrator.commands.serving import connect, pool_name, stop

    try:
        cfg = load_config(config) if config else None
        with connect(cfg, address):
            pool = pool_name(cfg, name)
            console.print(f"stopped pool {pool}: {', '.join(stop(pool)) or 'no teachers'}", highlight=False)
    except SkdError as exc:
        fail(exc)
