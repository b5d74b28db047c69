"""Compress options are declared once, on their config field: the CLI flags, the API keywords and
the recipe keys all come from that declaration (shiftc/options.py, shiftc/passes/recipe.py)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from shiftc.cli import build_parser
from shiftc.errors import UsageError
from shiftc.options import add_arguments, option
from shiftc.passes.recipe import CompressConfig, apply_overrides, compress_options, load_recipe, schema


def _compress_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["compress"]


def test_every_declared_option_is_a_flag_of_compress_and_nothing_else_is():
    declared = {o.flag for _, _, o in compress_options() if o.flag}
    own = {"-h", "--help", "--json", "-o", "--output", "--recipe", "--set"}
    flags = {s for a in _compress_parser()._actions for s in a.option_strings} - own
    negated = {f"--no-{f[2:]}" for f in declared}
    assert flags - negated == declared


def test_flags_reach_the_fields_they_are_declared_on(tmp_path):
    args = _compress_parser().parse_args([str(tmp_path), "-o", "x.onnx", "--shiftadd-bits", "2", "--group", "64",
                                          "--calib", "none", "--mp-candidates", "2,3", "--no-act-order",
                                          "--threads", "2"])
    given = {o.kw: getattr(args, o.kw) for _, _, o in compress_options() if o.flag}
    cfg = apply_overrides(CompressConfig(), given)
    assert (cfg.shiftadd.bits, cfg.shiftadd.group, cfg.shiftadd.act_order) == (2, 64, False)
    assert cfg.calib.corpus == "none" and cfg.mixed_precision.candidates == [2, 3] and cfg.threads == 2
    # what was not given keeps the dataclass default
    assert cfg.shiftadd.scale_mode == CompressConfig().shiftadd.scale_mode


def test_shared_keywords_go_to_the_pass_in_use():
    cfg = apply_overrides(CompressConfig(), {"binarize": "1bit", "group": 64, "distill_steps": 5})
    assert cfg.shiftadd is None and (cfg.binarize.mode, cfg.binarize.group, cfg.binarize.distill_steps) == ("1bit", 64, 5)
    with pytest.raises(UsageError, match="--binarize replaces the shift-add pass; --shiftadd-bits"):
        apply_overrides(CompressConfig(), {"binarize": "fdb", "bits": 2})
    cfg = apply_overrides(CompressConfig(), {"prune": 0.3})  # pruning flags alone: prune only
    assert cfg.shiftadd is None and cfg.prune.ratio == 0.3
    cfg = apply_overrides(CompressConfig(), {"prune": 0.3, "bits": 2})
    assert cfg.shiftadd.bits == 2 and cfg.prune.ratio == 0.3


def test_recipe_keys_are_overrides_too_and_unknown_names_are_refused():
    cfg = apply_overrides(CompressConfig(), {"shiftadd.damp": 0.05, "prune.lora_rank": 4})
    assert cfg.shiftadd.damp == 0.05 and cfg.prune.lora_rank == 4
    with pytest.raises(UsageError, match="unknown compress option 'bitz'"):
        apply_overrides(CompressConfig(), {"bitz": 2})
    with pytest.raises(UsageError, match="'shiftadd.dmap': unknown key"):
        apply_overrides(CompressConfig(), {"shiftadd.dmap": 0.1})
    with pytest.raises(UsageError, match="unknown recipe section 'shiftad'"):
        apply_overrides(CompressConfig(), {"shiftad.damp": 0.1})


def test_set_flag_takes_recipe_keys(tmp_path, capsys):
    from shiftc.cli import main

    assert main(["compress", str(tmp_path), "-o", str(tmp_path / "x.onnx"), "--set", "shiftadd.damp"]) != 0
    assert "--set 'shiftadd.damp': expected SECTION.KEY=VALUE" in capsys.readouterr().err


def test_api_takes_a_config_or_a_recipe_not_both(tmp_path):
    import shiftc

    recipe = tmp_path / "r.yaml"
    recipe.write_text("shiftadd:\n  bits: 2\n")
    with pytest.raises(UsageError, match="a config or a recipe, not both"):
        shiftc.compress("m.onnx", tmp_path / "x.onnx", config=CompressConfig(), recipe=recipe)


def test_schema_is_a_recipe_of_the_defaults(tmp_path):
    path = tmp_path / "schema.yaml"
    path.write_text(schema())
    assert load_recipe(path) == CompressConfig()
    # every flag is named beside its key
    text = schema()
    assert all(o.flag in text for _, _, o in compress_options() if o.flag)


def test_one_field_declares_key_flag_keyword_and_help():
    """The pattern docs/architecture.md shows for adding an option: the field alone."""

    @dataclasses.dataclass
    class Section:
        damp: float = option(0.01, flag="--damp", parse=float, help="GPTQ damping (default {default})")

    parser = argparse.ArgumentParser()
    add_arguments(parser, ((f, f.metadata["shiftc"]) for f in dataclasses.fields(Section)))
    assert parser.parse_args(["--damp", "0.2"]).damp == 0.2 and parser.parse_args([]).damp is None
    assert "GPTQ damping (default 0.01)" in parser.format_help()
    assert Section().damp == 0.01
