"""Show a memory plan as a rich table, with the verdict against a budget and what would make it fit."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from desktune.console import make_console
from desktune.memory.catalog import ALIASES, CATALOG
from desktune.memory.estimate import Plan, largest_fitting, process_share, suggestions
from desktune.units import human_bytes


def _title(plan: Plan) -> str:
    """What was planned: model, samples, device; with several processes, what one process runs, per device."""
    inp = plan.inputs
    if inp.nproc == 1:
        return (f"{inp.arch.name}: seq {inp.seq_len} x micro-batch {inp.micro_batch} "
                f"(x{inp.grad_accum} accumulation), {inp.device_type}")
    micro, accum = process_share(inp)
    offload = ", parameters offloaded to the host" if inp.distributed == "fsdp2" and inp.offload_params else ""
    return (f"{inp.arch.name}: {inp.nproc} processes ({inp.distributed}{offload}), each seq {inp.seq_len} x "
            f"micro-batch {micro} (x{accum} accumulation); per device ({inp.device_type})")


def plan_table(plan: Plan, title: str | None = None) -> Table:
    """The plan's components, their sizes and notes, and the total (per device)."""
    table = Table(title=title or _title(plan), show_footer=True)
    table.add_column("component", footer="total" if plan.inputs.nproc == 1 else "total per device", no_wrap=True)
    table.add_column("size", justify="right", footer=human_bytes(plan.total), no_wrap=True)
    table.add_column("where it comes from", footer=f"peak: {plan.phase}")
    for c in plan.components:
        table.add_row(c.name, human_bytes(c.bytes), c.note)
    return table


def verdict(plan: Plan, budget_bytes: int | None) -> Text:
    """One line: the total, and whether it fits the budget (a device's) with how much to spare or missing."""
    each = "" if plan.inputs.nproc == 1 else " per device"
    if budget_bytes is None:
        return Text(f"predicted peak: {human_bytes(plan.total)}{each}")
    spare = budget_bytes - plan.total
    if spare >= 0:
        return Text(f"fits: {human_bytes(plan.total)} of {human_bytes(budget_bytes)}{each} "
                    f"({human_bytes(spare)} to spare)", style="bold green")
    return Text(f"does not fit: {human_bytes(plan.total)} needed, {human_bytes(budget_bytes)} available{each} "
                f"({human_bytes(-spare)} short)", style="bold red")


def host_line(plan: Plan) -> Text:
    """The host memory the node needs for offloaded parameters, by part."""
    parts = "; ".join(f"{c.name} {human_bytes(c.bytes)}" for c in plan.host)
    return Text(f"host memory for offload: {human_bytes(plan.host_total)} ({parts})", style="bold")


def render_plan(plan: Plan, budget_bytes: int | None = None, *, advice: bool = True) -> Group:
    """Table, verdict, the largest fitting sequence length and micro-batch, and changes that would fit."""
    parts: list[Table | Text] = [plan_table(plan), verdict(plan, budget_bytes)]
    if plan.host:
        parts.append(host_line(plan))
    if budget_bytes is not None and advice:
        seq, batch = largest_fitting(plan.inputs, budget_bytes)
        parts.append(Text(f"largest that fit: seq_len {seq} at micro-batch {plan.inputs.micro_batch}; "
                          f"micro-batch {batch} at seq_len {plan.inputs.seq_len}"))
        if not plan.fits(budget_bytes):
            options = suggestions(plan.inputs, budget_bytes)
            if options:
                fixes = Table(title="changes that would fit", show_header=True)
                fixes.add_column("change")
                fixes.add_column("predicted peak", justify="right")
                for desc, p in options:
                    fixes.add_row(desc, human_bytes(p.total))
                parts.append(fixes)
            else:
                parts.append(Text("no single change or combination tried fits this budget", style="yellow"))
    return Group(*parts)


def print_plan(plan: Plan, budget_bytes: int | None = None, console: Console | None = None) -> None:
    """Print `render_plan` to a console (stdout by default)."""
    (console or make_console()).print(render_plan(plan, budget_bytes))


def catalog() -> Group:
    """The built-in architectures, one line each, then the other names each answers to (what `desktune plan
    --list` prints). Names and numbers are never cut or wrapped, and the table fits 80 columns, so
    `desktune plan --list | grep qwen` finds every row whole."""
    table = Table(title="Architectures desktune plans without a config.json (--model NAME)")
    for column in ("name", "family", "params", "layers", "hidden", "heads/kv", "vocab"):
        table.add_column(column, justify="left" if column in ("name", "family", "heads/kv") else "right",
                         no_wrap=True)
    for name, spec in CATALOG.items():
        table.add_row(name, spec.family, f"{spec.n_params / 1e9:.2f}B", str(spec.layers), str(spec.hidden),
                      f"{spec.heads} / {spec.kv_heads}", f"{spec.vocab:,}")
    names = [Text(f"  {', '.join(a for a, target in ALIASES.items() if target == name)} = {name}")
             for name in CATALOG if name in ALIASES.values()]
    return Group(table, Text("also accepted:"), *names)
