"""Tables written to a pipe or a file: whole rows at a generous width, no trailing padding."""

from rich.table import Table
from tests_helpers import run_cli

from dalikd.cli.report import print_eval, print_table
from dalikd.recipes import builtin_recipes, recipe_info


def _assert_plain(out: str) -> list[str]:
    lines = out.splitlines()
    assert lines and all(line == line.rstrip() for line in lines), "trailing spaces"
    assert "\x1b" not in out
    return lines


def test_pipelines_prints_one_whole_row_per_recipe(capsys):
    code, out, _ = run_cli(["pipelines"], capsys)
    assert code == 0
    lines = _assert_plain(out)
    for name, fn in builtin_recipes().items():  # the description whole, on the name's row
        description = recipe_info(fn).description
        assert any(f"│ {name} " in line and description in line for line in lines), name


def test_a_wide_table_keeps_its_rows_whole(capsys):
    # profile's summary: 8 columns whose "bound" cell wrapped to 5 lines at 80 columns
    table = Table(title="per scheme")
    cols = ["scheme", "DALI", "torchvision", "ratio", "CPU ratio", "x' / plain", "(CPU)", "bound"]
    for col in cols:
        table.add_column(col)
    row = ["cutmixpick", "1,234", "567", "2.18x", "2.40x", "0.91", "0.93",
           "normalize (cutmixpick): 1.23 ms"]  # fmt: skip
    table.add_row(*row)
    print_table(table)
    lines = _assert_plain(capsys.readouterr().out)
    assert len(lines) == 6  # title, top, header, rule, the row, bottom: nothing wrapped
    assert [cell.strip() for cell in lines[4].split("│")[1:-1]] == row


def test_a_box_free_table_has_no_padding(capsys):
    table = Table(show_header=False, box=None, pad_edge=False)  # doctor's
    table.add_column()
    table.add_column(overflow="fold")
    table.add_row("python", "3.12.1")
    table.add_row("native cpu_library", "/a/long/path/" * 10)
    print_table(table)
    lines = _assert_plain(capsys.readouterr().out)
    assert lines[0].split() == ["python", "3.12.1"]
    assert lines[1].split() == ["native", "cpu_library", "/a/long/path/" * 10]


def test_eval_table_in_a_pipe(capsys):
    print_eval("resnet18", "w.pt", {"count": 50000, "top1": 69.758, "top5": 89.078, "loss": 1.25})
    lines = _assert_plain(capsys.readouterr().out)
    assert any("50000" in line and "69.76" in line and "1.2500" in line for line in lines)
