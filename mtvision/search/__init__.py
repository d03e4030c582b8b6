"""Branching search: the branching spec (which tasks share which stage copies) and its FLOPs."""

from mtvision.models.branching_spec import BranchingSpec, SpecError, as_spec
from mtvision.search.flops import (
    BudgetError,
    FlopsTable,
    cheapest_flops,
    check_budget,
    costliest_flops,
    count_flops,
    format_flops,
    measure,
    spec_flops,
    stage_flops,
)

__all__ = [
    "BranchingSpec",
    "BudgetError",
    "FlopsTable",
    "SpecError",
    "as_spec",
    "check_budget",
    "cheapest_flops",
    "costliest_flops",
    "count_flops",
    "format_flops",
    "measure",
    "spec_flops",
    "stage_flops",
]
