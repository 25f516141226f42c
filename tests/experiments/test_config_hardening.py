"""Issue 13, items 2, 14, 15: experiment configs are data (MONAI expressions refused unless opted in),
typos are refused with the nearest name (config keys and bundle overrides), and every ``medssl`` error is
one line on stderr with a non-zero exit (a traceback only with ``--debug``).

The CLI is run as a user runs it: ``python -m medssl_monai.cli`` in a subprocess, this checkout first on
``PYTHONPATH``; the bundles through MONAI's own ``python -m monai.bundle run``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medssl_monai.bundle import check_cli_overrides
from medssl_monai.cli import main
from medssl_monai.experiments.config import load_config
from medssl_monai.experiments.pipeline import prepare_data, validate_pipeline
from medssl_monai.experiments.transfusion import validate_transfusion
from medssl_monai.sample_data import make_sample_data

REPO = Path(__file__).resolve().parents[2]
FINETUNE = REPO / "bundles" / "finetune_classification"


def medssl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "medssl_monai.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def one_line_error(r: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a failed command, checked for the format."""
    assert r.returncode != 0, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"medssl {command}: error: "), lines[0]
    return lines[0]


def write(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def touch_expr(marker: Path) -> str:
    """A ``$`` value that would leave ``marker`` behind if anything evaluated it (and is 1 otherwise)."""
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or 1"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """A small split, labelled, pseudonymised manifest of generated DICOM files."""
    root = tmp_path_factory.mktemp("sample")
    make_sample_data(root / "sample", n_patients=12, size=32)
    cfg = {"_base": str(root), "data": {"dicom_root": "@sample/dicom", "labels": "@sample/labels.csv",
                                        "split": {"train": 0.5, "val": 0.25, "test": 0.25},
                                        "label_fractions": [0.5, 1.0]}}
    return prepare_data(cfg, root / "prep")


def tiny_pipeline(manifest: Path, **finetune) -> dict:
    return {"run_dir": "@run", "data": {"manifest": str(manifest)}, "report": False,
            "common": {"backbone": "cbr_tiny", "image_size": 16, "in_channels": 1, "num_workers": 0},
            "phases": {"finetune": {"max_epochs": 1, "batch_size": 4, **finetune}}}


# -- item 2: experiment configs are data ------------------------------------------------------------------

def test_dollar_in_pipeline_config_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    cfg = write(tmp_path / "pipe.json", {"run_dir": "@run", "data": {"manifest": "@m.csv"},
                                         "phases": {"finetune": {"max_epochs": touch_expr(marker)}}})
    line = one_line_error(medssl("pipeline", str(cfg), cwd=tmp_path), "pipeline")
    assert str(cfg) in line and "phases.finetune.max_epochs" in line and "allow_expressions" in line
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("value, where", [
    ({"label_efficiency": {"fractions": ["$1/0"]}}, "label_efficiency.fractions[0]"),
    ({"phases": {"finetune": {"backbone_kwargs": {"block_inplanes": ["$[64]"]}}}},
     "phases.finetune.backbone_kwargs.block_inplanes[0]"),
    ({"phases": {"finetune": {"lr": "%/etc/evil.json#lr"}}}, "phases.finetune.lr"),
    ({"phases": {"finetune": {"lr": "@@lr_of_something_else"}}}, "phases.finetune.lr"),
    ({"phases": {"finetune": {"network_def#_target_": "os.system"}}}, "phases.finetune.network_def#_target_"),
    ({"phases": {"finetune": {"network_def": {"_target_": "os.system"}}}}, "phases.finetune.network_def._target_"),
])
def test_every_form_monai_would_interpret_is_refused(tmp_path: Path, value: dict, where: str) -> None:
    """Expressions, macros (which read other files, expressions included), references and components, at
    any depth; a plain '@path' stays this project's relative path."""
    cfg = {"data": {"manifest": "@m.csv"}, "phases": {"finetune": {}}}
    for k, v in value.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    with pytest.raises(ValueError, match=re.escape(f"pipe.json: {where}: ")):
        load_config(write(tmp_path / "pipe.json", cfg))
    assert load_config(write(tmp_path / "ok.json", {**cfg, "allow_expressions": True}))


def test_dollar_in_study_config_is_refused_and_accepted_with_opt_in(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    (tmp_path / "meta.csv").write_text("path,lesion_id,dx\n")
    study = {"arms": ["random"], "fractions": [1.0], "seeds": {"1.0": [0]},
             "table": {"path": "@meta.csv", "group_col": "lesion_id", "label_col": "dx"},
             "finetune": {"max_epochs": touch_expr(marker)}}
    cfg = write(tmp_path / "study.json", study)
    line = one_line_error(medssl("study", str(cfg), "--validate-only", cwd=tmp_path), "study")
    assert str(cfg) in line and "finetune.max_epochs" in line
    cfg = write(tmp_path / "study.json", {**study, "allow_expressions": True})
    r = medssl("study", str(cfg), "--validate-only", cwd=tmp_path)
    assert r.returncode == 0 and "valid" in r.stdout, r.stderr
    assert not marker.exists()  # validating runs nothing
    # a parent's opt-in covers the parent only, not a variant that extends it
    child = write(tmp_path / "child.json", {"extends": "@study.json", "medical": {}, "phase1": {"lr": "$0.1"}})
    with pytest.raises(ValueError, match=r"child\.json: phase1\.lr: "):
        load_config(child, required="arms")


def test_dollar_in_transfusion_config_is_refused(tmp_path: Path) -> None:
    cfg = json.loads((REPO / "configs/experiments/ham10000_transfusion.json").read_text())
    cfg["hybrid"]["slim"] = {"3": {"block_inplanes": "$__import__('os').getpid()"}}
    with pytest.raises(ValueError, match=r"hybrid\.slim\.3\.block_inplanes: .* Python expression"):
        load_config(write(tmp_path / "t.json", cfg), required="models")


def test_opted_in_expression_reaches_the_bundle_and_a_failed_phase_is_one_line(tmp_path: Path,
                                                                             manifest: Path) -> None:
    """With ``allow_expressions: true`` MONAI evaluates the value (the marker appears, one epoch is trained);
    a bundle that fails is one stderr line naming the phase, its log and the log's last error."""
    marker = tmp_path / "MARKER"
    cfg = write(tmp_path / "pipe.json", {**tiny_pipeline(manifest, max_epochs=touch_expr(marker)),
                                         "allow_expressions": True})
    r = medssl("-q", "pipeline", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert marker.exists()
    assert (tmp_path / "run" / "finetune" / "finetune_classification" / "models" / "model.pt").is_file()
    cfg = write(tmp_path / "bad.json", {**tiny_pipeline(manifest, backbone="no_such_backbone"),
                                        "run_dir": "@bad_run"})
    line = one_line_error(medssl("-q", "pipeline", str(cfg), cwd=tmp_path), "pipeline")
    log = tmp_path / "bad_run" / "logs" / "finetune.log"
    assert "phase finetune failed" in line and str(log) in line and "no_such_backbone" in line
    assert "no_such_backbone" in log.read_text()


# -- item 14: typos are refused with the nearest name --------------------------------------------------------

@pytest.mark.parametrize("command, change, suggestion", [
    ("pipeline", lambda c: c["phases"].update(fintune=c["phases"].pop("finetune")), "'finetune'"),
    ("pipeline", lambda c: c.update(label_efficency={"fractions": [1.0]}), "'label_efficiency'"),
    ("pipeline", lambda c: c["phases"]["finetune"].update(max_epoch=1), "'max_epochs'"),
    ("pipeline", lambda c: c["common"].update(num_worker=1), "'num_workers'"),
    ("pipeline", lambda c: c["data"].update(dicom_rot="x"), "'dicom_root'"),
    ("study", lambda c: c.update(min_seed=3), "'min_seeds'"),
    ("study", lambda c: c.update(parallel_finetune=2), "'parallel_finetunes'"),
    ("study", lambda c: c["finetune"].update(max_epoch=1), "'max_epochs'"),
    ("study", lambda c: c["table"].update(group_column="lesion_id"), "'group_col'"),
])
def test_typos_are_refused_with_the_nearest_name(tmp_path: Path, capsys, command: str, change,
                                                suggestion: str) -> None:
    """Through the CLI's ``main`` in this process (a subprocess per case would cost seconds each)."""
    (tmp_path / "meta.csv").write_text("path,lesion_id,dx\n")
    (tmp_path / "m.csv").write_text("path,patient_id\n")
    if command == "pipeline":
        cfg = tiny_pipeline(tmp_path / "m.csv")
    else:
        cfg = {"arms": ["random"], "fractions": [1.0], "seeds": {"1.0": [0]}, "finetune": {"max_epochs": 1},
               "table": {"path": "@meta.csv", "group_col": "lesion_id", "label_col": "dx"}, "run_dir": "@run"}
    change(cfg)
    path = write(tmp_path / "cfg.json", cfg)
    capsys.readouterr()
    code = main([command, str(path)])
    line = one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), command)
    assert f"did you mean {suggestion}?" in line and str(path) in line
    assert not (tmp_path / "run" / "logs").exists()  # nothing was launched


def test_transfusion_typos_are_refused() -> None:
    cfg = load_config(REPO / "configs/experiments/ham10000_transfusion.json", required="models")
    cfg.update(target=[0.8], similarity={"max_example": 10}, common={"image_sise": 32})
    problems = " | ".join(validate_transfusion(cfg, check_data=False))
    for needle in ("did you mean 'targets'?", "did you mean 'max_examples'?", "did you mean 'image_size'?"):
        assert needle in problems, (needle, problems)


def test_demo_config_has_no_unknown_key() -> None:
    assert validate_pipeline(load_config(REPO / "configs" / "pipeline_demo.json")) == []


def test_bundle_cli_refuses_an_override_typo(tmp_path: Path) -> None:
    """``python -m monai.bundle run --max_epoch 1`` trained the default 5 epochs; the bundle's first
    initialize step now stops it before anything is built."""
    root = tmp_path / "ft"
    root.mkdir()
    (root / "configs").symlink_to(FINETUNE / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root), "--config_file",
                        str(root / "configs" / "train.json"), "--max_epoch", "1"], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode != 0
    assert "'max_epoch' is not a key of" in r.stderr and "did you mean 'max_epochs'?" in r.stderr
    assert not (root / "output" / "train.log").exists()  # stopped before setup_run
    main = "/site-packages/monai/bundle/__main__.py"  # sys.argv[0] under ``python -m monai.bundle``
    cfgs = str([str(FINETUNE / "configs" / "train.json"), str(FINETUNE / "configs" / "multi_gpu_train.json")])
    ok = [main, "run", "--config_file", cfgs, "--max_epochs", "1", "--network_def#norm", "batch",
          "--train#dataset", "x", "--meta_file", "m.json", "--_meta_#version", "x"]
    check_cli_overrides(ok)  # known ids, a component's new argument, MONAI's own arguments: accepted
    with pytest.raises(ValueError, match=r"--val_intervall: .*did you mean 'val_interval'"):
        check_cli_overrides([*ok, "--val_intervall=2"])
    with pytest.raises(ValueError, match=r"'nothing' is not a key of 'train'"):
        check_cli_overrides([*ok, "--train#nothing#x", "1"])
    check_cli_overrides(["script.py", "run", "--max_epoch", "1"])  # not the bundle CLI: not checked


# -- item 15: every CLI error is one line -------------------------------------------------------------------

def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    (tmp_path / "salt").write_bytes(b"abc")
    (tmp_path / "salt").chmod(0o600)  # private, so the length is what is wrong with it
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f.dcm").write_bytes(b"not dicom")
    (tmp_path / "broken.json").write_text('{"phases": ')
    cases = [
        (["index", "tree", "--out", "o.csv", "--pseudonymize", "salt"], "index", "salt too short"),
        (["split", "missing.csv"], "split", "missing.csv"),
        (["pipeline", "broken.json"], "pipeline", "not valid JSON"),
        (["index", "tree"], "index", "required: --out"),  # a usage error: one line too, exit 2
    ]
    for args, command, needle in cases:
        r = medssl(*args, cwd=tmp_path)
        assert needle in one_line_error(r, command), (args, r.stderr)
    r = medssl("--debug", "split", "missing.csv", cwd=tmp_path)
    assert r.returncode != 0 and "Traceback" in r.stderr and "missing.csv" in r.stderr


@pytest.mark.parametrize("args, command, code, needle", [
    (["index", "--out", "o.csv"], "index", 2, "give a folder to index, --dicomweb URL or --dimse HOST:PORT"),
    (["index", "tree", "--dicomweb", "http://127.0.0.1:9", "--out", "o.csv"], "index", 2, "give one source"),
    (["index", "tree", "--count-only", "--out", "o.csv"], "index", 2, "--count-only and --local-copy are for a PACS"),
    (["index", "nowhere", "--out", "o.csv"], "index", 1, "nowhere: no such file or folder"),
    (["index", "tree", "--out", "o.csv"], "index", 1, "nothing indexed under tree: 1 file(s) seen, all skipped"),
    (["bundles", "export"], "bundles", 2, "needs a target folder"),
    (["local-copy", "prune"], "local-copy", 1, "give --manifest MANIFEST"),
])
def test_every_command_error_is_one_style_with_one_exit_code_per_kind(tmp_path: Path, capsys, monkeypatch, args,
                                                                      command, code, needle) -> None:
    """One style everywhere (``medssl <command>: error: ...``): exit 2 when the command line itself is wrong
    (with the --help hint, as argparse's own usage errors), 1 for everything else."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "f.dcm").write_bytes(b"not dicom")
    capsys.readouterr()
    got = main(["-q", *args])
    line = one_line_error(subprocess.CompletedProcess([], got, "", capsys.readouterr().err), command)
    assert got == code and needle in line, (got, line)
    assert line.endswith(f"(see medssl {command} --help)") == (code == 2), line


@pytest.mark.parametrize("args, command, needle", [
    (["pipeline", "missing.json"], "pipeline", "missing.json: No such file or directory"),
    (["study", "list.json"], "study", "must be a mapping, got list"),
    (["transfusion", "nomodels.json"], "transfusion", "needs a 'models' entry"),
    (["study", "yaml.yaml"], "study", "not valid YAML"),
])
def test_config_file_errors_are_one_line(tmp_path: Path, capsys, monkeypatch, args, command, needle) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "nomodels.json").write_text("{}")
    (tmp_path / "yaml.yaml").write_text("arms: [random\n")
    capsys.readouterr()
    code = main(args)
    assert needle in one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), command)


def test_bare_driver_refuses_the_reporting_step_before_running(tmp_path: Path) -> None:
    """Results back to the PACS sit in the reporting layer: the driver alone refuses a config naming them,
    before anything is written; ``run_pipeline_and_report`` (``medssl pipeline``) runs them."""
    from medssl_monai.experiments.pipeline import run_pipeline

    cfg = {"_base": str(tmp_path), "run_dir": "@run", "data": {"manifest": "m.csv"},
           "phases": {"finetune": {}, "predict": {}, "results_to_pacs": {}}}
    with pytest.raises(ValueError, match="results_to_pacs: a reporting step"):
        run_pipeline(cfg)
    assert not (tmp_path / "run").exists()


# -- issue 19 item 13, issue 17 item 7: values of the wrong type or range, found at start-up -----------------

def _bundle_defaults() -> dict[str, list]:
    from medssl_monai.bundle.overrides import load_bundle_config

    found: dict[str, list] = {}
    for name in ("simclr_natural", "micle_medical", "finetune_classification"):
        for file in ("train.json", "inference.json"):
            path = REPO / "bundles" / name / "configs" / file
            if path.is_file():
                for k, v in load_bundle_config(path).items():
                    found.setdefault(k, []).append(v)
    return found


def test_override_table_names_real_keys_and_accepts_every_shipped_default() -> None:
    from medssl_monai.bundle.overrides import OVERRIDE_TYPES
    from medssl_monai.data.cache import CACHE_MODES

    defaults = _bundle_defaults()
    assert set(OVERRIDE_TYPES) <= set(defaults), set(OVERRIDE_TYPES) - set(defaults)
    for key, values in defaults.items():
        if key in OVERRIDE_TYPES:
            for v in values:
                if not (isinstance(v, str) and v[:1] in "$@%"):
                    assert OVERRIDE_TYPES[key].check(v) is None, (key, v)
    assert OVERRIDE_TYPES["cache"].choices == CACHE_MODES


@pytest.mark.parametrize("key, value, needle", [
    ("lr", "nan", "expected a number, got 'nan'"),
    ("lr", float("nan"), "expected a finite number"),
    ("lr", 0, "must be > 0"),
    ("source_size", 0, "must be > 0"),
    ("source_size", [150, -2], "must be > 0"),
    ("image_size", [1, 2, 3, 4], "a list of 1 to 3"),
    ("max_epochs", 2.5, "expected a whole number"),
    ("batch_size", True, "expected a whole number, got True"),
    ("label_fraction", 1.5, "must be <= 1"),
    ("seed", -1, "must be >= 0"),
    ("num_workers", "4", "expected a whole number, got '4'"),
    ("temperature", "0.1", "expected a number"),
    ("val_interval", 0, "must be >= 1"),
    ("knn_interval", None, "got null"),
    ("max_bad_images", -0.1, "must be >= 0"),
    ("amp", "yes", "expected one of"),
    ("cache", "disk", "expected one of ['none', 'host', 'device']"),
    ("views_on", "gpu", "expected one of"),
    ("resume", "false", "expected true or false, got 'false'"),
])
def test_wrong_override_values_are_named(key: str, value, needle: str) -> None:
    from medssl_monai.bundle.overrides import check_override_values

    problems = check_override_values({key: value, "lr_ok": "x"}, "finetune")
    assert len(problems) == 1 and problems[0].startswith(f"finetune.{key}: ") and needle in problems[0], problems
    assert check_override_values({key: "$@other"}, "finetune") == []  # code: checked (refused) elsewhere


def test_bundle_cli_refuses_a_value_of_the_wrong_type(tmp_path: Path) -> None:
    """``--lr nan`` reached the optimizer as the string 'nan' (TypeError); ``--source_size 0`` crashed numpy."""
    main = "/site-packages/monai/bundle/__main__.py"
    cfg = str(FINETUNE / "configs" / "train.json")
    with pytest.raises(ValueError, match=r"--lr: expected a number, got 'nan'.*--source_size: must be > 0"):
        check_cli_overrides([main, "run", "--config_file", cfg, "--lr", "nan", "--source_size=0"])
    args = tmp_path / "args.json"
    args.write_text(json.dumps({"config_file": cfg, "batch_size": "16"}))
    with pytest.raises(ValueError, match=r"--batch_size: expected a whole number, got '16'"):
        check_cli_overrides([main, "run", "--args_file", str(args)])
    check_cli_overrides([main, "run", "--config_file", cfg, "--lr", "1e-3", "--source_size", "[150, 200]",
                         "--amp", "bf16", "--resume", "False", "--seed", "3"])


def test_pipeline_values_are_checked_before_anything_runs(tmp_path: Path, capsys) -> None:
    (tmp_path / "m.csv").write_text("path,patient_id\n")
    cfg = tiny_pipeline(tmp_path / "m.csv", lr="nan")
    cfg["common"]["source_size"] = 0
    cfg["report"] = "false"  # a string read as true before
    cfg["data"]["label_fractions"] = [0.5, 0]
    cfg["label_efficiency"] = {"fractions": [1.0], "seeds": [0, "1"], "inits": ["random", "pretraind"]}
    problems = validate_pipeline({**cfg, "_base": str(tmp_path)})
    text = " | ".join(problems)
    for needle in ("phases.finetune.lr: expected a number, got 'nan'", "common.source_size: must be > 0",
                   "report: expected true or false, got 'false'", "data.label_fractions[1]: must be > 0",
                   "label_efficiency.seeds[1]: expected a whole number, got '1'",
                   "label_efficiency.inits[1]: expected one of ['pretrained', 'random'], got 'pretraind'"):
        assert needle in text, (needle, text)
    path = write(tmp_path / "cfg.json", cfg)
    capsys.readouterr()
    line = one_line_error(subprocess.CompletedProcess([], main(["pipeline", str(path)]), "",
                                                      capsys.readouterr().err), "pipeline")
    assert "phases.finetune.lr: expected a number" in line
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_study_and_transfusion_values_are_checked() -> None:
    from medssl_monai.experiments.study import validate_study

    study = load_config(REPO / "configs/experiments/ham10000_label_efficiency.json", required="arms")
    assert validate_study(study, check_data=False) == []
    bad = {**study, "finetune": {**(study.get("finetune") or {}), "lr": "nan"}, "parallel_finetunes": "2",
           "eval_from_validation": "yes", "fractions": [0.1, "1.0"]}
    text = " | ".join(validate_study(bad, check_data=False))
    for needle in ("parallel_finetunes: expected a whole number, got '2'",
                   "eval_from_validation: expected true or false, got 'yes'",
                   "fractions[1]: expected a number, got '1.0'"):
        assert needle in text, (needle, text)
    bad = {**study, "medical_per_arm": {"phase1_micle": {"temperature": -1}}}
    assert "medical_per_arm.phase1_micle.temperature: must be > 0" in " | ".join(validate_study(bad, check_data=False))
    trans = load_config(REPO / "configs/experiments/ham10000_transfusion.json", required="models")
    assert validate_transfusion(trans, check_data=False) == []
    text = " | ".join(validate_transfusion({**trans, "finetune": {**trans["finetune"], "batch_size": 0}},
                                           check_data=False))
    assert "finetune.batch_size: must be >= 1" in text, text
    trans["similarity"] = {**trans["similarity"], "max_examples": 0}
    trans["targets"] = [0.8, 80]
    text = " | ".join(validate_transfusion(trans, check_data=False))
    for needle in ("similarity.max_examples: must be >= 1", "targets[1]: must be <= 1"):
        assert needle in text, (needle, text)


# -- issue 18 item 9: the pipeline takes a salt path, and keeps the salt away from the data ----------------

def _salt(path: Path, mode: int = 0o600) -> Path:
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(mode)
    return path


def test_pipeline_uses_a_given_salt_path(tmp_path: Path, manifest: Path) -> None:
    """``data.pseudonymize: "/secure/salt.key"`` pseudonymises with that salt (no salt is written into the run
    folder): the manifest's pseudonyms are that salt's HMACs of the files' PatientIDs."""
    import pandas as pd
    import pydicom

    from medssl_monai.data.pseudonymize import Pseudonymizer

    sample = manifest.parents[2] / "sample"
    salt = _salt(tmp_path / "secure" / "salt.key")
    cfg = {"_base": str(tmp_path), "run_dir": "@run",
           "data": {"dicom_root": str(sample / "dicom"), "labels": str(sample / "labels.csv"),
                    "pseudonymize": "@secure/salt.key", "split": {"train": 0.5, "val": 0.25, "test": 0.25},
                    "label_fractions": [1.0]}}
    assert validate_pipeline({**cfg, "phases": {}}) == []
    out = prepare_data(cfg, tmp_path / "run")
    ids = set()
    for f in (sample / "dicom").rglob("*"):
        try:
            ids.add(str(pydicom.dcmread(f, stop_before_pixels=True).PatientID))
        except (pydicom.errors.InvalidDicomError, AttributeError, IsADirectoryError, OSError):
            continue  # folders, and the sample's deliberately broken files
    assert len(ids) >= 12
    pz = Pseudonymizer.from_file(salt)
    got = set(pd.read_csv(out)["patient_id"])
    assert len(got) >= 12 and got <= {pz.patient(i) for i in ids}  # (a patient with only broken files is absent)
    assert not (tmp_path / "run" / "data" / "salt.key").exists()


@pytest.mark.parametrize("case, needle", [
    ("missing", "does not exist"),
    ("public", "open to group/others (mode 0644)"),
    ("in_run", "is inside the run folder"),
    ("beside_manifest", "is inside the manifest's folder"),
    ("string_bool", "got the string 'false'"),
    ("number", "expected true, false or a file path"),
])
def test_salt_path_problems_are_refused_before_the_run(tmp_path: Path, capsys, case: str, needle: str) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "m.csv").write_text("path,patient_id\n")
    cfg = tiny_pipeline(tmp_path / "data" / "m.csv")
    salt = {"missing": "@no/salt.key", "public": str(_salt(tmp_path / "s" / "salt.key", 0o644)),
            "in_run": str(_salt(tmp_path / "run" / "salt.key")),
            "beside_manifest": str(_salt(tmp_path / "data" / "salt.key")), "string_bool": "false", "number": 1}[case]
    cfg["data"]["pseudonymize"] = salt
    path = write(tmp_path / "cfg.json", cfg)
    capsys.readouterr()
    line = one_line_error(subprocess.CompletedProcess([], main(["pipeline", str(path)]), "",
                                                      capsys.readouterr().err), "pipeline")
    assert "data.pseudonymize: " in line and needle in line, line
    assert not (tmp_path / "run" / "logs").exists()
    if case in ("in_run", "beside_manifest"):  # asked for: accepted
        assert validate_pipeline({**load_config(path), "data": {**cfg["data"], "salt_in_run_dir": True}}) == []


def test_salt_in_a_run_folder_given_on_the_command_line_is_refused(tmp_path: Path) -> None:
    from medssl_monai.experiments.pipeline import run_pipeline

    salt = _salt(tmp_path / "elsewhere" / "salt.key")
    cfg = {"_base": str(tmp_path), "data": {"manifest": "m.csv", "pseudonymize": str(salt)}, "phases": {}}
    with pytest.raises(ValueError, match="is inside the run folder"):
        run_pipeline(cfg, run_dir=tmp_path / "elsewhere")


def test_bundle_run_with_lr_nan_stops_before_training(tmp_path: Path) -> None:
    """Through MONAI's own CLI: the bundle's first initialize step names the key, nothing is built."""
    root = tmp_path / "ft"
    root.mkdir()
    (root / "configs").symlink_to(FINETUNE / "configs")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root), "--config_file",
                        str(root / "configs" / "train.json"), "--lr", "nan"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode != 0 and "--lr: expected a number, got 'nan'" in r.stderr, r.stderr[-2000:]
    assert not (root / "output" / "train.log").exists()
