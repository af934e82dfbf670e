"""`rac init`: a rac project in any git repository, the same pipeline as this repo's."""

from pathlib import Path

import yaml
from click.testing import CliRunner
from conftest import DVC, ROOT, assert_bad_input, run_cmd

from stages.cli import main


def test_init_writes_this_repos_pipeline_params_and_model(tmp_path: Path) -> None:
    run_cmd(["git", "init", "-q"], tmp_path)
    result = CliRunner().invoke(main, ["init", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dvc.yaml").read_bytes() == (ROOT / "dvc.yaml").read_bytes()
    assert (tmp_path / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()
    shipped = {p.name: p.read_bytes() for p in (ROOT / "data" / "embedded").iterdir()}
    assert {p.name: p.read_bytes() for p in (tmp_path / "data" / "embedded").iterdir()} == shipped
    assert "hardlink,copy" in (tmp_path / ".dvc" / "config").read_text()
    # DVC reads the new project's pipeline: every stage of this repo's is there.
    dag = run_cmd([*DVC, "dag", "--md"], tmp_path)
    for stage in ("versions", "model", "rollout", "hessians@rac", "prune@rac", "evaluate_dense", "report"):
        assert stage in dag, stage


def test_init_with_a_shipped_preset_merges_it(tmp_path: Path) -> None:
    run_cmd(["git", "init", "-q"], tmp_path)
    result = CliRunner().invoke(main, ["init", "--preset", "r1-distill-qwen-7b", str(tmp_path)])
    assert result.exit_code == 0, result.output
    preset = yaml.safe_load((ROOT / "presets" / "r1-distill-qwen-7b.yaml").read_text())
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    scalars = {k: v for k, v in preset.items() if not isinstance(v, dict)}
    assert scalars and all(params[k] == v for k, v in scalars.items())


def test_init_refuses_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    not_git = tmp_path / "plain"
    not_git.mkdir()
    assert_bad_input(CliRunner().invoke(main, ["init", str(not_git)]), "not a git repository", "git init")
    assert list(not_git.iterdir()) == []
    repo = tmp_path / "repo"
    repo.mkdir()
    run_cmd(["git", "init", "-q"], repo)
    (repo / "params.yaml").write_text("mine: 1\n")
    assert_bad_input(CliRunner().invoke(main, ["init", str(repo)]), "already has", "params.yaml")
    assert sorted(p.name for p in repo.iterdir()) == [".git", "params.yaml"]
    assert (repo / "params.yaml").read_text() == "mine: 1\n"
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    run_cmd(["git", "init", "-q"], fresh)
    assert_bad_input(CliRunner().invoke(main, ["init", "--preset", "no-such", str(fresh)]), "no-such", "shipped")
    assert sorted(p.name for p in fresh.iterdir()) == [".git"]
