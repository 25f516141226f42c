"""``medssl`` command line: index an export, adapt a table, split a manifest, run the pipeline, export the
bundles."""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["CliError", "UsageError", "build_parser", "main"]

logger = logging.getLogger("medssl")


def _setup_logging(quiet: bool) -> None:
    from .data.privacy import silence_pydicom_logger

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s",
                        stream=sys.stderr)
    silence_pydicom_logger()


def _print_summary(stats: dict, out: Path, pseudonymized: bool) -> None:
    lines = [
        f"files seen:            {stats['files_seen']}",
        f"indexed:               {stats['files_indexed']} files, {stats['instances']} image rows"
        + (f" ({stats['files_reused']} unchanged files reused)" if stats.get("files_reused") else ""),
        f"skipped:               {stats['files_skipped']}",
    ]
    lines += [f"  {code:<21}{n}" for code, n in stats["skipped_by_reason"].items()]
    lines += [
        f"patients:              {stats['patients']}",
        f"studies:               {stats['studies']}",
        f"series:                {stats['series']}",
        f"multi-image patients:  {stats['multi_image_patients']}",
        f"time:                  {stats['seconds']:.2f} s",
        f"manifest:              {out}" + ("  (pseudonymised)" if pseudonymized else ""),
    ]
    print("\n".join(lines))


def _bar_callback(bar):
    def update(n: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
            bar.refresh()
        bar.update(n)

    return update


def _cohort(args: argparse.Namespace):
    from .data.cohort import CohortFilter

    return CohortFilter.create(args.modality, args.body_part, args.study_date, args.series_description)


def _local_copy_arg(args: argparse.Namespace) -> str | None:
    """``--local-copy DIR``; ``--cache DIR`` is its deprecated former name."""
    if getattr(args, "cache", None):
        if args.local_copy and args.local_copy != args.cache:
            raise ValueError("give --local-copy (--cache is its former name), not both")
        logger.warning("--cache is deprecated: it is now called --local-copy")
        return args.cache
    return args.local_copy


def cmd_index_pacs(args: argparse.Namespace) -> int:
    """``medssl index --dicomweb URL`` / ``--dimse HOST:PORT``: fetch the cohort into the local copy, index it."""
    from .data.labels import label_mapping, read_labels
    from .data.pseudonymize import Pseudonymizer
    from .pacs.credentials import load_credentials
    from .pacs.index import index_pacs
    from .pacs.summary import format_cohort_counts, summarize_selection

    if args.root or (args.dicomweb and args.dimse):
        raise UsageError("give one source: a folder, --dicomweb URL or --dimse HOST:PORT")
    bar = None
    try:
        cohort = _cohort(args)
        local_copy = _local_copy_arg(args)
        creds = load_credentials(args.auth_file) if args.dicomweb else None
        labels = read_labels(args.labels, args.label_key, args.label_col) if args.labels else None
        pz = Pseudonymizer.from_file(args.pseudonymize) if args.pseudonymize else None
        mapping = None
        if labels is not None:  # conflicts refused before anything is fetched (named as pseudonyms if pseudonymising)
            label_mapping(labels, args.label_key, args.label_col, pz, source=args.labels)
            mapping = label_mapping(labels, args.label_key, args.label_col, source=args.labels)  # original keys
        if not args.quiet and not args.count_only:
            from tqdm.auto import tqdm

            bar = tqdm(unit="instance", desc="fetching", file=sys.stderr, disable=None)
        fetch, result = index_pacs(
            args.out, dicomweb=args.dicomweb, dimse=args.dimse, cohort=cohort, local_copy=local_copy,
            credentials=creds, ca_bundle=args.ca_bundle, client_cert=args.client_cert,
            client_key=args.client_key, calling_ae=args.calling_ae, called_ae=args.called_ae,
            download_workers=args.download_workers, timeout=args.timeout, count_only=args.count_only,
            fetch_progress=_bar_callback(bar) if bar is not None else None, workers=args.workers,
            pseudonymizer=pz, incremental=not args.full, expand_frames=args.expand_frames, labels=labels,
            label_key=args.label_key, label_column=args.label_col, max_pixels=_max_pixels(args),
            retrieve=args.retrieve, move_ae=args.move_ae, move_port=args.move_port)
    finally:
        if bar is not None:
            bar.close()
    if args.count_only:
        print(format_cohort_counts(summarize_selection(fetch.selection, mapping, args.label_key), fetch.server))
        return 0
    print(f"fetched:               {fetch.fetched} of {fetch.instances} selected instances "
          f"({fetch.already_cached} already local, {fetch.failed} failed) from {fetch.server}")
    if fetch.withdrawn:
        print(f"withdrawn:             {fetch.withdrawn} (in the local copy, no longer selected: left out of the "
              "manifest; `medssl local-copy prune` deletes them)")
    else:
        print("withdrawn:             0")
    _print_summary(result.stats, Path(args.out), pz is not None)
    if fetch.failed:
        raise CliError(f"{fetch.failed} instance(s) could not be fetched; run the same command again to fetch them")
    return 0


def cmd_local_copy(args: argparse.Namespace) -> int:
    """``medssl local-copy prune|purge`` (alias ``medssl cache``): delete withdrawn instances, or everything."""
    from .data.pseudonymize import Pseudonymizer
    from .pacs.index import default_local_copy, prune_local_copy, purge_local_copy

    if not args.local_copy and not args.manifest:
        raise CliError("give --manifest MANIFEST (its local copy is <stem>.cache beside it) or --local-copy DIR")
    folder = Path(args.local_copy) if args.local_copy else default_local_copy(args.manifest)
    if args.action == "prune":
        pz = Pseudonymizer.from_file(args.salt) if args.salt and Path(args.salt).is_file() else None
        gone = prune_local_copy(folder, pz)
        print(f"pruned:                {len(gone)} instance(s) no longer selected deleted from {folder}")
        return 0
    deleted = purge_local_copy(folder, args.manifest, args.salt)
    print(f"purged:                {deleted['instances']} instance(s) and the folder {folder}; path map: "
          f"{'deleted' if deleted['path_map'] else 'none'}; salt: {'deleted' if deleted['salt'] else 'kept'}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .data.dicom import check_index_outputs, index_tree
    from .data.labels import label_mapping, read_labels
    from .data.manifest import errors_path
    from .data.pseudonymize import Pseudonymizer

    if args.dicomweb or args.dimse:
        return cmd_index_pacs(args)
    if args.count_only or args.local_copy or args.cache:
        raise UsageError("--count-only and --local-copy are for a PACS source (--dicomweb URL or --dimse HOST:PORT)")
    if not args.root:
        raise UsageError("give a folder to index, --dicomweb URL or --dimse HOST:PORT")
    cohort = _cohort(args)
    root = Path(args.root)
    if not root.exists():
        raise CliError(f"{root}: no such file or folder")
    # every output, salt and label problem is found before the tree is read (and before a salt is created)
    check_index_outputs(root, args.out)
    labels = read_labels(args.labels, args.label_key, args.label_col) if args.labels else None
    pz = Pseudonymizer.from_file(args.pseudonymize) if args.pseudonymize else None
    if labels is not None:  # a key with two labels is refused before the tree is read
        label_mapping(labels, args.label_key, args.label_col, pz, source=args.labels)
    bar = None
    if not args.quiet:
        from tqdm.auto import tqdm

        bar = tqdm(unit="file", desc="indexing", file=sys.stderr, disable=None)
    try:
        result = index_tree(root, args.out, workers=args.workers, pseudonymizer=pz, incremental=not args.full,
                            expand_frames=args.expand_frames, labels=labels, label_key=args.label_key,
                            label_column=args.label_col, progress=_bar_callback(bar) if bar is not None else None,
                            cohort=cohort, follow_links=args.follow_links, max_pixels=_max_pixels(args))
    finally:
        if bar is not None:
            bar.close()
    stats = result.stats
    _print_summary(stats, Path(args.out), pz is not None)
    if stats["instances"] == 0:
        raise CliError(f"nothing indexed under {root}: {stats['files_seen']} file(s) seen, all skipped; "
                       f"reasons in {errors_path(args.out)}")
    return 0


def _max_pixels(args: argparse.Namespace) -> int:
    from .data.manifest import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels


def _check_table_out(out: str, inputs: Sequence[str]) -> None:
    """``--out`` of table/split: a writable file that is not one of the inputs (checked before any work)."""
    from .data.manifest import check_output_file

    out_p = check_output_file(out, "--out manifest")
    if any(Path(i).resolve() == out_p for i in inputs):
        raise ValueError(f"{out_p}: --out names the input table itself: choose another file")


def cmd_table(args: argparse.Namespace) -> int:
    from .data.manifest import write_manifest
    from .data.pseudonymize import Pseudonymizer
    from .data.table import table_to_manifest

    _check_table_out(args.out, [args.csv])
    pz = Pseudonymizer.from_file(args.pseudonymize) if args.pseudonymize else None
    df = table_to_manifest(args.csv, path_col=args.path_col, group_col=args.group_col,
                           label_col=args.label_col or None, instance_col=args.instance_col, root=args.root,
                           pseudonymizer=pz, max_pixels=_max_pixels(args))
    write_manifest(df, args.out)
    groups = df.groupby("patient_id").size()
    print(f"rows: {len(df)}  groups: {len(groups)}  multi-image groups: {int((groups >= 2).sum())}  -> {args.out}")
    return 0


def _parse_fractions(text: str, flag: str) -> dict[str, float]:
    """``train=0.7,val=0.15`` -> a dict; anything else is one line naming the flag and the bad part."""
    fractions = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            fractions[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{flag}: {part.strip()!r} is not name=number (e.g. train=0.7,val=0.15,test=0.15)") from None
    return fractions


def _parse_numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a comma-separated list of numbers (e.g. 0.01,0.1,1.0)") from None


def cmd_split(args: argparse.Namespace) -> int:
    from .data.grouping import LEVELS
    from .ingest import split_manifest

    fractions = _parse_fractions(args.fractions, "--fractions")
    label_fractions = _parse_numbers(args.label_fractions, "--label-fractions") if args.label_fractions else None
    out = args.out or args.manifest
    if args.out:
        _check_table_out(args.out, [args.manifest])
    df = split_manifest(args.manifest, fractions, label_fractions, seed=args.seed, level=args.level,
                        label_col=args.label_col, out=out)
    counts = df.groupby("split")[LEVELS[args.level]].nunique().to_dict()
    print(f"groups per split: {counts} -> {out}")
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .reporting.pipeline_report import run_pipeline_and_report

    roots = run_pipeline_and_report(args.config, args.run_dir, force=args.force)
    for name, root in roots.items():
        print(f"{name:<9} {root}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .experiments.config import load_config
    from .experiments.study import validate_study
    from .reporting.study_summary import run_study_and_summarize

    cfg = load_config(args.config, required="arms")
    problems = validate_study(cfg)
    if problems:
        raise CliError(f"{args.config}: study config problems: " + "; ".join(problems))
    if args.validate_only:
        print(f"{args.config}: valid ({len(cfg['arms'])} arms, fractions {cfg['fractions']})")
        return 0
    if args.finished_only and args.force:
        raise UsageError("--finished-only reports what exists: drop --force")
    results = run_study_and_summarize(cfg, args.run_dir, force=args.force, finished_only=args.finished_only)
    print(results.to_string(index=False))
    return 0


def cmd_transfusion(args: argparse.Namespace) -> int:
    from .experiments.config import load_config
    from .experiments.transfusion import plan_runs, validate_transfusion
    from .reporting.transfusion_summary import run_transfusion_and_summarize

    cfg = load_config(args.config, required="models")
    problems = validate_transfusion(cfg)
    if problems:
        raise CliError(f"{args.config}: transfusion config problems: " + "; ".join(problems))
    if args.validate_only:
        print(f"{args.config}: valid ({len(cfg['models'])} backbones, {len(plan_runs(cfg))} fine-tuning runs)")
        return 0
    results = run_transfusion_and_summarize(cfg, args.run_dir, force=args.force)
    print(results.drop(columns=["before", "after"]).to_string(index=False))
    return 0


def cmd_results_to_dicom(args: argparse.Namespace) -> int:
    from .pacs.credentials import load_credentials
    from .reporting.dicom_sr import results_to_dicom, stow_files

    predictions = Path(args.predictions or Path(args.bundle) / "output" / "predictions.csv")
    creds = load_credentials(args.auth_file) if args.stow else None
    table = results_to_dicom(predictions, args.manifest, args.bundle, args.out_dir)
    print(f"SR objects:            {len(table)} -> {args.out_dir} (keyed table: {Path(args.out_dir) / 'results.csv'})")
    if args.stow:
        from .pacs.audit import AuditLog
        from .pacs.index import default_local_copy

        sent, already = stow_files(args.stow, [Path(args.out_dir) / f for f in table["sr_file"]], creds,
                                   args.ca_bundle, audit=AuditLog.for_local_copy(default_local_copy(args.manifest)))
        print(f"sent (STOW-RS):        {sent} ({already} already held by the server: same SOP Instance UIDs)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .bundle.finetune import without_architecture
    from .experiments.predict import predict_images, predict_set_manifest

    bundle, out = Path(args.bundle), Path(args.out)
    run_dir = Path(args.run_dir) if args.run_dir else bundle / "output" / "predict"
    manifest, id_name = predict_set_manifest(args.images, run_dir / f"{out.name.split('.')[0]}.manifest.csv",
                                             id_col=args.id_col)
    overrides = without_architecture({"num_workers": args.num_workers, "batch_size": args.batch_size})
    predict_images(bundle, manifest, id_name, out, run_dir, out.name.split(".")[0], overrides=overrides, force=True)
    print(f"predictions:           {out} ({id_name}, prob_<class> with 4 decimals)")
    return 0


def cmd_bundles(args: argparse.Namespace) -> int:
    from .bundle.export import export_bundles
    from .bundle.locate import BUNDLE_NAMES, bundles_root

    if args.action == "list":
        root = bundles_root()
        for name in BUNDLE_NAMES:
            print(f"{name:<25} {root / name}")
        return 0
    if not args.dir:
        raise UsageError("medssl bundles export needs a target folder")
    written = export_bundles(args.dir, args.bundle or None, overwrite=args.overwrite)
    for path in written:
        print(f"{path.name:<25} {path}")
    return 0


def _parse_budgets(text: str, flag: str, kind: type) -> list:
    """``50,100`` / ``0.01,0.05`` -> numbers; anything else is one line naming the flag."""
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise CliError(f"{flag}: {text!r} is not a comma-separated list of {'whole numbers' if kind is int else 'numbers'}"
                       ) from None


def cmd_select(args: argparse.Namespace) -> int:
    from .experiments.select import select_manifest

    budgets = _parse_budgets(args.budget, "--budget", int) if args.budget else []
    fractions = _parse_budgets(args.fraction, "--fraction", float) if args.fraction else []
    stratify = [c.strip() for c in args.stratify.split(",") if c.strip()] if args.stratify else []
    result = select_manifest(
        args.manifest, args.checkpoint, args.out_dir, budgets=budgets, fractions=fractions, level=args.level,
        strategy=args.strategy, seed=args.seed, stratify=stratify, split=args.split or None,
        cache_dir=args.cache_dir, backbone=args.backbone,
        backbone_kwargs=_json_arg(args.backbone_kwargs, "--backbone-kwargs"), in_channels=args.in_channels,
        image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device)
    for spec in result.budgets:
        print(f"{spec['column']:<18} {spec['count']} {args.level} groups  (fine-tune: label_fraction={spec['label_fraction']:g})")
    print(f"worklist:  {result.worklist}" + (f"\noriginal UIDs (private): {result.worklist_uids}"
                                            if result.worklist_uids else ""))
    print(f"manifest:  {result.manifest}")
    return 0


def cmd_monai_label_app(args: argparse.Namespace) -> int:
    from .bundle.monai_label import write_monai_label_app

    app = write_monai_label_app(args.dir, args.bundle, overwrite=args.overwrite)
    for path in [app / "main.py", *sorted(p for p in (app / "model").iterdir() if p.is_dir())]:
        print(path)
    return 0


def _json_arg(text: str | None, flag: str) -> dict:
    """A JSON object given on the command line (e.g. a slimmed net's ``{"block_inplanes": [...]}``)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"{flag}: not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise CliError(f"{flag}: expected a JSON object, got {text!r}")
    return value


def cmd_similarity(args: argparse.Namespace) -> int:
    from .experiments.similarity import compare_checkpoints
    from .reporting.similarity import save_similarity

    df = compare_checkpoints(
        args.ckpt_a, args.ckpt_b, args.manifest, backbone_a=args.backbone_a, backbone_b=args.backbone_b,
        kwargs_a=_json_arg(args.backbone_kwargs_a, "--backbone-kwargs-a"),
        kwargs_b=(_json_arg(args.backbone_kwargs_b, "--backbone-kwargs-b") if args.backbone_kwargs_b is not None
                  else None), split=args.split, limit=args.limit, image_size=args.image_size,
        in_channels=args.in_channels, method=args.method, mode=args.mode, max_examples=args.max_examples,
        num_workers=args.num_workers)
    out = Path(args.out)
    save_similarity(df, out.with_suffix(".csv"), out.with_suffix(".png"),
                    title=f"{args.method.upper()} ({args.mode}, {df.attrs.get('n_rows', '?')} rows)")
    print(df.round(3).to_string())
    print(f"-> {out.with_suffix('.csv')}, {out.with_suffix('.png')}")
    return 0


class CliError(Exception):
    """An error the user can act on: ``main`` prints it as one line, ``medssl <command>: error: <message>``,
    and exits with ``exit_code`` (1)."""

    exit_code = 1


class UsageError(CliError):
    """The command line itself is wrong (flags that do not go together, a missing argument): exit status 2,
    as argparse's own usage errors, so a script can tell a typo from a failed run."""

    exit_code = 2


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line too (``--help`` still shows the usage); sub-parsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_line(e: BaseException) -> str:
    """An exception as one readable line: an OSError names its file, a multi-line message is joined."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}" + (f" -> {e.filename2}" if e.filename2 else "")
    else:
        from .pacs._deps import MissingExtraError  # the error path only: no monai import for `medssl --help`

        text = str(e) or type(e).__name__
        if isinstance(e, KeyError) and e.args:  # str(KeyError) is only the quoted key
            text = f"missing key {e.args[0]!r}"
        elif not isinstance(e, (CliError, ValueError, RuntimeError, FileNotFoundError, MissingExtraError)):
            text = f"{type(e).__name__}: {text}"
    lines = (re.sub(r"^\s*-\s+", "", line).strip() for line in text.splitlines())  # "- item" bullets
    return "; ".join(line for line in lines if line).replace(":; ", ": ")


def build_parser() -> argparse.ArgumentParser:
    from .ingest import DEFAULT_LABEL_COLUMN, DEFAULT_LABEL_KEY

    p = _Parser(prog="medssl", description=__doc__)
    p.add_argument("--quiet", "-q", action="store_true", help="only warnings and the summary")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("index", help="index a DICOM/NIfTI folder tree (headers only) into a manifest CSV")
    s.add_argument("root", nargs="?", help="folder (a PACS export, with or without DICOMDIR) or a single file")
    s.add_argument("--out", required=True, help="manifest CSV; errors go to <out>.errors.csv")
    s.add_argument("--workers", type=int, default=1, help="processes reading headers in parallel")
    s.add_argument("--pseudonymize", metavar="SALT_FILE",
                   help="hash patient ids and UIDs with this secret salt (created if absent); paths become keys")
    s.add_argument("--full", action="store_true", help="re-read every file even if the manifest exists")
    s.add_argument("--expand-frames", action="store_true", help="one row per frame of multi-frame objects")
    s.add_argument("--labels", help="CSV of labels joined on --label-key (original, un-hashed ids); a key with "
                   "two different labels is refused")
    s.add_argument("--label-key", default=DEFAULT_LABEL_KEY,
                   help="what a label belongs to: patient_id | study_uid | accession_number | series_uid | sop_uid")
    s.add_argument("--label-col", default=DEFAULT_LABEL_COLUMN, help="column of --labels holding the label")
    s.add_argument("--follow-links", action="store_true",
                   help="follow symbolic links to files/folders outside ROOT (otherwise reported, not read)")
    s.add_argument("--max-pixels", type=int, default=None,
                   help="skip images with more Rows x Columns per frame than this (default 100 million; 0: no limit)")
    g = s.add_argument_group("cohort filters (DICOM matching on the headers; also sent to a PACS)")
    g.add_argument("--modality", help="Modality values, comma-separated, e.g. CR,DX")
    g.add_argument("--body-part", help="BodyPartExamined values, comma-separated, e.g. CHEST")
    g.add_argument("--study-date", help="StudyDate range YYYYMMDD-YYYYMMDD (either end may be left open)")
    g.add_argument("--series-description", help="SeriesDescription pattern with * and ? (case-sensitive)")
    g = s.add_argument_group("PACS source (instead of a folder); see docs/pacs.md")
    g.add_argument("--dicomweb", metavar="URL", help="DICOMweb root, e.g. https://pacs/dicom-web; credentials from "
                   "MEDSSL_DICOMWEB_USER+MEDSSL_DICOMWEB_PASSWORD, MEDSSL_DICOMWEB_TOKEN or --auth-file")
    g.add_argument("--dimse", metavar="HOST:PORT", help="classic DICOM: C-FIND, then C-GET (or C-MOVE: --retrieve)")
    g.add_argument("--retrieve", choices=["get", "move"], default="get",
                   help="DIMSE retrieval: C-GET (default) or C-MOVE to a Storage SCP run for the retrieve")
    g.add_argument("--move-ae", default=None, help="C-MOVE destination AE title the PACS knows (default: --calling-ae)")
    g.add_argument("--move-port", type=int, default=None,
                   help="port our C-MOVE Storage SCP listens on (the one the PACS's entry for --move-ae names)")
    g.add_argument("--calling-ae", default="MEDSSL", help="our AE title (DIMSE)")
    g.add_argument("--called-ae", default="ANY-SCP", help="the PACS's AE title (DIMSE)")
    g.add_argument("--local-copy", metavar="DIR", default=None,
                   help="folder for the fetched DICOM (default: <out stem>.cache beside --out)")
    g.add_argument("--cache", metavar="DIR", default=None, help=argparse.SUPPRESS)  # former name of --local-copy
    g.add_argument("--count-only", action="store_true",
                   help="print the cohort (patients, studies, series, instances; by modality, body part, year, "
                        "label) and download nothing")
    g.add_argument("--auth-file", help="file of one line, 'user:password' or a bearer token; must be private (chmod 600)")
    g.add_argument("--ca-bundle", help="PEM file of the hospital CA (TLS verification is always on; this file wins "
                   "over REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE)")
    g.add_argument("--client-cert", help="PEM client certificate for mutual TLS (may hold the key too; then chmod 600)")
    g.add_argument("--client-key", help="PEM private key of --client-cert (must be private: chmod 600)")
    g.add_argument("--download-workers", type=int, default=4, help="parallel downloads")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds before a request counts as failed")
    s.set_defaults(func=cmd_index)

    for name, text in (("local-copy", "delete a PACS local copy's withdrawn instances (prune) or all of it (purge)"),
                       ("cache", "alias of local-copy")):
        s = sub.add_parser(name, help=text)
        s.add_argument("action", choices=["prune", "purge"],
                       help="prune: delete instances no longer selected; purge: delete the local copy, the "
                            "manifest's path map and, with --salt, the salt")
        s.add_argument("--manifest", help="the manifest the local copy belongs to (its .pathmap.csv is purged)")
        s.add_argument("--local-copy", metavar="DIR", help="the local copy (default: <manifest stem>.cache)")
        s.add_argument("--salt", metavar="SALT_FILE",
                       help="the run's salt: keys the audit log's hashes; purge deletes it")
        s.set_defaults(func=cmd_local_copy)

    s = sub.add_parser("table", help="turn a CSV of image paths with a group column into a manifest")
    s.add_argument("csv")
    s.add_argument("--out", required=True)
    s.add_argument("--path-col", default="path")
    s.add_argument("--group-col", default="patient_id", help="grouping key, e.g. lesion_id for HAM10000")
    s.add_argument("--label-col", default="label", help="label column (e.g. dx); empty for none")
    s.add_argument("--instance-col", default=None, help="per-image id column (e.g. image_id)")
    s.add_argument("--root", default=None, help="folder relative paths start from (default: the CSV's)")
    s.add_argument("--pseudonymize", metavar="SALT_FILE")
    s.add_argument("--max-pixels", type=int, default=None,
                   help="refuse images with more width x height than this, read from their headers "
                        "(default 100 million; 0: no limit)")
    s.set_defaults(func=cmd_table)

    s = sub.add_parser("split", help="patient-level train/val/test split and nested label fractions")
    s.add_argument("manifest")
    s.add_argument("--out", default=None, help="output manifest (default: overwrite the input)")
    s.add_argument("--level", default="patient", choices=["patient", "study", "series"])
    s.add_argument("--fractions", default="train=0.7,val=0.15,test=0.15")
    s.add_argument("--label-fractions", default="0.01,0.1,0.2,1.0", help="nested; empty to skip")
    s.add_argument("--label-col", default="label", help="stratify by this column; empty for no stratification")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_split)

    s = sub.add_parser("select", help="which images to label first: a worklist and nested labeled_<p>pct columns "
                       "from a pretrained embedding (docs/selection.md)")
    s.add_argument("manifest", help="the manifest; its --split rows are the unlabelled pool")
    s.add_argument("--checkpoint", required=True, help="pretrained backbone weights, e.g. a MICLe bundle's models/model.pt")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--budget", help="groups to label; comma-separated for nested budgets, e.g. 50,100,200")
    g.add_argument("--fraction", help="fraction(s) of the pool's groups, e.g. 0.01,0.02,0.05 (nested)")
    s.add_argument("--level", default="patient", choices=["patient", "study", "series", "image"],
                   help="what gets labelled together (default: patient)")
    s.add_argument("--strategy", default="typiclust", choices=["typiclust", "kcenter", "random"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stratify", default=None, help="manifest column(s) to stratify by, e.g. modality,body_part")
    s.add_argument("--split", default="train", help="the pool: rows of this split (empty: every row)")
    s.add_argument("--out-dir", "--out", dest="out_dir", required=True,
                   help="folder for worklist.csv, manifest.csv and selection.json (--out: its former name)")
    s.add_argument("--cache-dir", default=None, help="embedding cache (default: <out>/embedding_cache)")
    s.add_argument("--backbone", default="resnet18", help="the checkpoint's architecture (as pretrained)")
    s.add_argument("--backbone-kwargs", default=None, help="JSON for the backbone factory")
    s.add_argument("--in-channels", type=int, default=3)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--num-workers", type=int, default=0)
    s.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    s.set_defaults(func=cmd_select)

    s = sub.add_parser("pipeline", help="run data -> phase 1 -> phase 2 -> phase 3 -> evaluation from a config")
    s.add_argument("config", help="pipeline config (JSON or YAML)")
    s.add_argument("--run-dir", default=None, help="run folder (default: the config's run_dir)")
    s.add_argument("--force", action="store_true", help="re-run phases whose outputs exist")
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("study", help="the label-efficiency study: arms x label fractions x seeds")
    s.add_argument("config")
    s.add_argument("--run-dir", default=None)
    s.add_argument("--force", action="store_true", help="re-run finished runs")
    s.add_argument("--validate-only", action="store_true", help="check the config and data, run nothing")
    s.add_argument("--finished-only", action="store_true",
                   help="train nothing: the results table, summary and predict sets of the fine-tunes finished "
                        "so far (a study still running elsewhere, or stopped early)")
    s.set_defaults(func=cmd_study)

    s = sub.add_parser("transfusion", help="Transfusion experiments: init, hybrid reuse, Mean-Var, similarity")
    s.add_argument("config")
    s.add_argument("--run-dir", default=None)
    s.add_argument("--force", action="store_true", help="re-run finished runs")
    s.add_argument("--validate-only", action="store_true", help="check the config and data, run nothing")
    s.set_defaults(func=cmd_transfusion)

    s = sub.add_parser("results-to-dicom", help="classifier predictions -> DICOM SR per image (optionally STOW-RS)")
    s.add_argument("--bundle", required=True, help="the trained fine-tuning bundle (its metadata and models/model.pt)")
    s.add_argument("--manifest", required=True,
                   help="the manifest predicted on; a pseudonymised one needs its private .pathmap.csv beside it")
    s.add_argument("--predictions", default=None, help="predictions CSV (default: <bundle>/output/predictions.csv)")
    s.add_argument("--out-dir", "--out", dest="out_dir", required=True,
                   help="folder for the SR files and results.csv (private: original UIDs; --out: its former name)")
    s.add_argument("--stow", metavar="URL", help="DICOMweb root to store the SR objects in (credentials as for index)")
    s.add_argument("--auth-file", help="file of one line, 'user:password' or a bearer token (chmod 600)")
    s.add_argument("--ca-bundle", help="PEM file of the hospital CA")
    s.set_defaults(func=cmd_results_to_dicom)

    s = sub.add_parser("predict", help="class probabilities of new images (a folder, an id + path CSV or a manifest) "
                       "with a trained fine-tuning bundle")
    s.add_argument("bundle", help="the trained fine-tuning bundle (models/model.pt, classes.json, architecture.json)")
    s.add_argument("images", help="an image folder, a CSV with 'path' and an id column (e.g. blind_id), or a manifest")
    s.add_argument("--out", required=True, help="the predictions CSV to write (.csv or .csv.gz)")
    s.add_argument("--id-col", default=None, help="the CSV's id column (default: its one '*_id' column)")
    s.add_argument("--run-dir", default=None, help="logs and the images' manifest (default: <bundle>/output/predict)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--num-workers", type=int, default=0)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("bundles", help="list the shipped MONAI bundles, or export them to a folder of your own")
    s.add_argument("action", choices=["list", "export"])
    s.add_argument("dir", nargs="?", help="export: target folder; each bundle goes to DIR/<name>/ (MONAI Label's "
                   "model folder layout, and a --bundle_root for python -m monai.bundle run)")
    s.add_argument("--bundle", action="append", metavar="NAME",
                   help="export only this bundle (repeatable): simclr_natural, micle_medical, finetune_classification")
    s.add_argument("--overwrite", action="store_true", help="replace bundle folders that exist in DIR")
    s.set_defaults(func=cmd_bundles)

    s = sub.add_parser("monai-label-app", help="write a MONAI Label app (main.py + model/<bundle>) that serves and "
                       "trains the classifier bundle from a DICOMweb datastore (docs/monai_label.md)")
    s.add_argument("dir", help="the app folder (monailabel start_server --app DIR)")
    s.add_argument("--bundle", help="a trained fine-tune bundle folder to copy as it is into DIR/model/ "
                   "(default: the shipped finetune_classification configs, untrained)")
    s.add_argument("--overwrite", action="store_true", help="replace an app (and its model folder) in DIR")
    s.set_defaults(func=cmd_monai_label_app)

    s = sub.add_parser("similarity", help="layer-wise SVCCA/CKA between two models' stages on the same images")
    s.add_argument("ckpt_a")
    s.add_argument("ckpt_b")
    s.add_argument("--manifest", required=True)
    s.add_argument("--backbone-a", default="resnet18")
    s.add_argument("--backbone-b", default=None, help="default: --backbone-a")
    s.add_argument("--backbone-kwargs-a", default=None,
                   help='JSON for the backbone factory, e.g. a slimmed net: \'{"block_inplanes": [64, 64, 128, 256]}\'')
    s.add_argument("--backbone-kwargs-b", default=None,
                   help="default: --backbone-kwargs-a when both are the same backbone, else none; '{}' for a full-width b")
    s.add_argument("--method", default="cka", choices=["cka", "svcca"])
    s.add_argument("--mode", default="pool", choices=["pool", "positions"], help="conv maps: pooled or per position")
    s.add_argument("--split", default=None)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--max-examples", type=int, default=2000, help="rows kept per stage (bounds memory)")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--in-channels", type=int, default=3)
    s.add_argument("--num-workers", type=int, default=0)
    s.add_argument("--out", default="similarity.csv", help="the CSV to write; its plot is written beside it (.png)")
    s.set_defaults(func=cmd_similarity)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Any error is one line on stderr, ``medssl <command>: error: <message>``, and exit
    status 1 (2 for a usage error: argparse's or a :class:`UsageError`); ``--debug`` lets the exception through, traceback and all."""
    args = build_parser().parse_args(argv)
    try:
        _setup_logging(args.quiet)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"medssl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        hint = f" (see medssl {args.command} --help)" if isinstance(e, UsageError) else ""
        print(f"medssl {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        return e.exit_code if isinstance(e, CliError) else 1


if __name__ == "__main__":
    sys.exit(main())
