"""The teacher cache's key covers the data plan: every DataConfig and DataPlan field is in the key
(and changing it changes the key) or on NOT_IN_KEY with its reason (and changing it does not).

A new data setting (issue 21's base view, normalization, raw-uint8 codec; issue 25's source kind)
is a field of DataConfig or DataPlan: it is keyed by default, and these tests say so field by
field; leaving one out takes an entry in NOT_IN_KEY that says why it cannot change the pixels or
the logits."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields, replace

import pytest
from conftest import make_dataset

from dalikd.batch import InputNorm
from dalikd.config import DataConfig, KDConfig, choices
from dalikd.data import scan_dataset
from dalikd.plan import DataPlan, resolve_plan
from dalikd.recipes import resolve
from dalikd.teacher_cache import Format, cache_key, plan_key
from dalikd.teacher_cache.key import KEYED_WHERE, NOT_IN_KEY


def plan_fields() -> list[tuple[str, str]]:
    """(owner, name) of every field the plan carries: DataConfig's (as plan.data) and its own."""
    own = [("plan", f.name) for f in fields(DataPlan) if f.name != "data"]
    return [("data", f.name) for f in fields(DataConfig)] + own


def uncovered(plan: DataPlan, key: dict) -> list[str]:
    """Fields of ``plan`` neither in ``key`` nor excused by NOT_IN_KEY."""
    names = [f.name for f in fields(plan.data)] + [f.name for f in fields(plan) if f.name != "data"]
    return [n for n in names if n not in key and n not in NOT_IN_KEY]


def other_value(value, annotation):
    """A different value of the same type (the perturbation each field gets)."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(c for c in choices(annotation) if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 + 0.01
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, InputNorm):
        return InputNorm(tuple(v + 1 for v in value.mean), value.std)
    if isinstance(value, tuple):
        return (value[0] * 0.5, *value[1:]) if value else (1,)
    if callable(value) or value is None:
        return resolve("mixup")  # another mixing recipe: aug and aug_source key it
    raise AssertionError(f"add a perturbation for {type(value).__name__}: {value!r}")


def base_plan(name: str) -> DataPlan:
    """A plan (built directly: nothing resolved) in which field ``name`` acts: a mixing recipe,
    the GPU where only the GPU decoder reads it."""
    data = DataConfig(path="/data", mixing="composed", resize="dali", threads=2)
    plan = DataPlan(data, "cpu", "cutmix", "sample", 1, 0, InputNorm((1, 2, 3), (4, 5, 6)),
                    resolve("cutmix"))  # fmt: skip
    if name in KEYED_WHERE and not KEYED_WHERE[name](plan):
        plan = replace(plan, device="gpu")
    assert name not in KEYED_WHERE or KEYED_WHERE[name](plan), name
    return plan


@pytest.mark.parametrize(("owner", "name"), plan_fields(), ids=lambda v: v)
def test_every_plan_field_changes_the_key_or_is_excused(owner, name):
    plan = base_plan(name)
    holder = plan.data if owner == "data" else plan
    annotation = typing.get_type_hints(DataConfig)[name] if owner == "data" else None
    changed_value = other_value(getattr(holder, name), annotation)
    if owner == "data":
        changed = replace(plan, data=replace(plan.data, **{name: changed_value}))
    else:
        changed = replace(plan, **{name: changed_value})
    before, after = plan_key(plan), plan_key(changed)
    assert uncovered(plan, before) == []
    if name in NOT_IN_KEY:
        assert name not in before and before == after, f"{name} is excused but keyed"
    else:
        assert before[name] != after[name], f"{name} changed but its key entry did not"
        assert {k for k in before if before[k] != after[k]} == {name}


def test_the_exclusions_are_fields_with_reasons():
    names = {name for _, name in plan_fields()}
    assert set(NOT_IN_KEY) <= names, set(NOT_IN_KEY) - names
    assert all(reason.strip() for reason in NOT_IN_KEY.values())
    assert set(KEYED_WHERE) <= names - set(NOT_IN_KEY)


def test_a_field_where_it_does_not_act_is_keyed_as_none():
    plan = base_plan("mixing")
    assert plan_key(plan)["mixing"] == "composed"
    flip = replace(plan, aug="flip", pool_size=1, recipe=resolve("flip"))  # nothing mixes
    assert plan_key(flip)["mixing"] is None
    assert plan_key(replace(flip, data=replace(flip.data, mixing="native")))["mixing"] is None
    assert plan_key(plan)["hw_decoder_load"] is None  # CPU: the GPU decoder's share is unused
    assert plan_key(replace(plan, device="gpu"))["hw_decoder_load"] == 0.65


def test_a_new_field_is_keyed_and_a_key_that_forgot_one_is_caught():
    """What a new data setting meets: the plan's key takes it as it is, and a key written by
    hand that left it out is reported as uncovered (what these tests would fail on)."""

    @dataclass(frozen=True)
    class NextDataConfig(DataConfig):
        base_view: str = "random_resized_crop"  # e.g. issue 21's

    plan = replace(base_plan("seed"), data=NextDataConfig(**dataclasses.asdict(base_plan(
        "seed").data)))  # fmt: skip
    key = plan_key(plan)
    assert key["base_view"] == "random_resized_crop" and uncovered(plan, key) == []
    by_hand = {k: v for k, v in key.items() if k != "base_view"}
    assert uncovered(plan, by_hand) == ["base_view"]


def test_the_cache_key_holds_the_plan_key(tmp_path):
    root = make_dataset(tmp_path / "d", n_train=3, n_val=2)
    data = DataConfig(path=str(root), image_size=16, batch_size=2, threads=1)
    plan = resolve_plan(data, "cutmixpick", device="cpu")
    key = cache_key(plan, scan_dataset(root), teacher="resnet34", teacher_weights="X",
                    kd=KDConfig(), precision="float32", world_size=1, channels_last=True,
                    graph_format=2, fmt=Format())  # fmt: skip
    assert plan_key(plan).items() <= key.items()
    assert uncovered(plan, key) == []
    assert key["gpu"] == "" and key["decoder"] == "cpu" and key["format"] == "exact"
