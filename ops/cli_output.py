"""Output as a terminal shows it, for every ``gridq`` command: tables whose ids and names
are never cut (at 80 columns they stay whole, the other cells wrap; piped or redirected,
every value whole on its row), messages on one line without doubled punctuation, errors as
one ``error:`` line. Scripts that want fields ask for ``--json`` where a command has it."""

from __future__ import annotations

import re
import weakref
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console, RenderableType
    from rich.table import Table

_WHOLE: weakref.WeakKeyDictionary[Table, tuple[str, ...]] = weakref.WeakKeyDictionary()  # see table()


def table(*columns: str, whole: tuple[str, ...] = ()) -> Table:
    """A table whose cells fold rather than cut: at 80 columns a value wraps onto the next
    line, never ends in an ellipsis; the ``whole`` columns (ids, names) keep each value on one
    line when the others can be narrowed to make room (:func:`show`). Piped, every column
    gets the room its values need."""
    from rich.table import Table

    made = Table()
    for column in columns:
        made.add_column(column, overflow="fold")
    _WHOLE[made] = whole
    return made


def show(*renderables: RenderableType | str, blank_line: bool = False) -> None:
    """Print tables and lines: in a terminal, at its width; piped or captured (not a terminal),
    wide enough that no table wraps or cuts a value, and lines never wrapped (a script, grep or
    a file gets each value whole, on its row)."""
    from rich.console import Console
    from rich.table import Table

    console, shown = fitted(Console(), renderables)
    if blank_line:
        console.print()
    for renderable in shown:
        console.print(renderable, soft_wrap=not isinstance(renderable, Table))


def fitted(console: Console, renderables: Sequence[RenderableType | str]
           ) -> tuple[Console, list[RenderableType | str]]:
    """The console to print ``renderables`` on, and what to print: not a terminal, a console
    wide enough for their tables; a terminal, this one, each table too wide for it either
    given widths that keep its ids whole (:func:`_keep_whole`) or, when the other columns
    would be left a few characters each, shown a row at a time (:func:`_stacked`)."""
    from rich.console import Console
    from rich.table import Table

    wide = Console(width=1 << 16)
    tables = [wide.measure(r).maximum for r in renderables if isinstance(r, Table)]
    if not console.is_terminal:
        return Console(width=max([console.width, *tables])), list(renderables)
    shown: list[RenderableType | str] = []
    for renderable in renderables:
        if isinstance(renderable, Table) and wide.measure(renderable).maximum > console.width \
                and not _keep_whole(renderable, console.width):
            shown.append(_stacked(renderable))
        else:
            shown.append(renderable)
    return console, shown


def _keep_whole(shown: Table, width: int) -> bool:
    """Widths for a table wider than the terminal: its ``whole`` columns (ids, names) as wide
    as their longest value, the room left shared out among the others, the narrowest needs
    met first (their cells wrap). Rich's own narrowing would fold an id as soon as a name.
    False, and nothing set, if the whole columns would leave the others under 8 characters
    each on average, or take more than 60% of ``width``."""
    from rich.cells import cell_len
    from rich.text import Text

    whole = _WHOLE.get(shown, ())
    want = {}
    for index, column in enumerate(shown.columns):
        cells = [cell_len(Text.from_markup(str(cell)).plain) for cell in column.cells]
        header = str(column.header)
        if header in whole:
            want[index] = max([cell_len(header), *cells])
        else:  # its header may wrap between words
            want[index] = max([cell_len(word) for word in header.split()] + cells)
    fixed = [i for i, column in enumerate(shown.columns) if str(column.header) in whole]
    room = width - (3 * len(shown.columns) + 1) - sum(want[i] for i in fixed)  # borders and padding
    others = sorted((i for i in want if i not in fixed), key=lambda i: want[i])
    if not fixed or room < 8 * len(others) or sum(want[i] for i in fixed) > 0.6 * width:
        return False
    for left, index in enumerate(others):
        want[index] = max(1, min(want[index], room // (len(others) - left)))
        room -= want[index]
    for index, column in enumerate(shown.columns):
        column.width = want[index]
    return True


def _stacked(wide: Table) -> RenderableType:
    """A table too wide for the terminal, a row at a time: each column's name, then its value
    (the way ``psql``'s expanded display reads), rows apart by a blank line."""
    from rich.console import Group
    from rich.table import Table

    headers = [str(column.header) for column in wide.columns]
    cells = [list(column.cells) for column in wide.columns]
    records: list[RenderableType] = []
    for row in range(wide.row_count):
        record = Table.grid(padding=(0, 2))
        record.add_column(style="bold", no_wrap=True)
        record.add_column(overflow="fold")
        for header, column in zip(headers, cells, strict=True):
            record.add_row(header, column[row])
        records.append(record)
        if row < wide.row_count - 1:
            records.append("")
    return Group(*records)


def plural(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def sentence(message: str) -> str:
    """A message on one line, without punctuation doubled where texts were joined (an
    exception's "… refused." inside "…: {exc}. Is Redis running?" reads "refused.. Is")."""
    return re.sub(r"(?<=[\w)\]'\"`])([.!?])\.(?=\s|$)", r"\1", " ".join(message.split()))


def say(exc: BaseException) -> None:
    """A typed error is for people: its message on one line, not a traceback."""
    typer.echo(f"error: {type(exc).__name__}: {sentence(str(exc))}", err=True)
