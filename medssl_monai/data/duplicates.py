"""One image, one row: duplicate instances found when indexing and refused when training or evaluating.

An export can hold the same SOP instance twice (two copies, two file names). Indexed twice, it trains twice
per epoch and, worse, can sit on both sides of a split; the same SOP Instance UID under two patients is one
image carrying two identities (a re-export or a merge gone wrong), so it would count as two patients.

At index time (:func:`drop_duplicate_files`): of the files holding the same instance (same SOP Instance UID,
frame and slice) for one patient, the first by path (sorted, so the choice does not depend on the walk
order) is kept and the others become ``duplicate_instance`` rows of the errors table; when the files disagree
about the patient, none is kept (which identity is right cannot be told) and every copy is a
``uid_conflict`` row. Bundles (:func:`check_unique_instances`) refuse a manifest that still has duplicates
(e.g. rows repeated by a hand edit or a concatenation), with counts.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["DUPLICATE_CODES", "DuplicateInstanceError", "check_unique_instances", "drop_duplicate_files",
           "instance_key"]

#: errors-table codes of the files left out as copies; such files are re-read by the next index (the kept
#: copy may have gone)
DUPLICATE_CODES = ("duplicate_instance", "uid_conflict")


class DuplicateInstanceError(ValueError):
    """A manifest lists the same instance (or the same file) more than once."""


def instance_key(df: pd.DataFrame, id_col: str = "sop_uid") -> pd.Series:
    """``id|frame|slice`` per row (frame/slice empty when absent): one image of a multi-frame/volume file."""
    key = df[id_col].astype("string").fillna("")
    for col in ("frame_index", "slice_index"):
        if col in df.columns:
            key = key + "|" + df[col].astype("string").fillna("")
    return key


def drop_duplicate_files(manifest: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``manifest`` without the files that repeat an instance, and the errors rows of those files.

    Errors rows have ``path``, ``reason``, ``code`` (:data:`DUPLICATE_CODES`), ``file_size``,
    ``file_mtime_ns``; reasons name no path or identifier (they reach logs of pseudonymised runs).
    """
    columns = ["path", "reason", "code", "file_size", "file_mtime_ns"]
    if manifest.empty or "sop_uid" not in manifest.columns:
        return manifest, pd.DataFrame(columns=columns)
    has_uid = manifest["sop_uid"].notna() & (manifest["sop_uid"].astype("string") != "")
    rows = manifest[has_uid].assign(_key=instance_key(manifest[has_uid]))
    files_per_key = rows.groupby("_key")["path"].nunique()
    shared = rows[rows["_key"].isin(files_per_key[files_per_key > 1].index)]
    if shared.empty:
        return manifest, pd.DataFrame(columns=columns)
    conflict: set[str] = set()
    duplicate: set[str] = set()
    for _, group in shared.groupby("_key"):
        paths = sorted(set(group["path"]))
        if group["patient_id"].astype("string").nunique(dropna=False) > 1:
            conflict.update(paths)
        else:
            duplicate.update(paths[1:])  # the first path keeps the instance
    duplicate -= conflict
    stamps = manifest.drop_duplicates("path").set_index("path")[["file_size", "file_mtime_ns"]]
    errors = []
    for path in sorted(conflict | duplicate):
        if path in conflict:
            code, reason = "uid_conflict", ("the same SOP Instance UID is indexed under another patient from "
                                            "another file: every copy left out (which identity is right is unknown)")
        else:
            code, reason = "duplicate_instance", ("a copy of an instance indexed from another file (the first by "
                                                  "path is kept)")
        errors.append({"path": path, "reason": reason, "code": code, "file_size": stamps.at[path, "file_size"],
                       "file_mtime_ns": stamps.at[path, "file_mtime_ns"]})
    kept = manifest[~manifest["path"].isin(conflict | duplicate)].reset_index(drop=True)
    return kept, pd.DataFrame(errors, columns=columns)


def check_unique_instances(df: pd.DataFrame, where: str = "manifest") -> None:
    """Raise :class:`DuplicateInstanceError` (with counts) when a row repeats an image: the same ``path``
    (+ frame/slice) or the same ``sop_uid`` (+ frame/slice) twice."""
    problems = []
    for col, what in (("path", "file"), ("sop_uid", "SOP Instance UID")):
        if col not in df.columns:
            continue
        present = df[df[col].notna() & (df[col].astype("string") != "")]
        keys = instance_key(present, col)
        repeated = keys[keys.duplicated(keep=False)]
        if len(repeated):
            problems.append(f"{repeated.nunique()} {what}(s) on {len(repeated)} rows")
    if problems:
        raise DuplicateInstanceError(f"{where}: the same image is listed more than once ({'; '.join(problems)}): "
                                     "each image would train or count more than once, and could sit in two splits; "
                                     "re-index (duplicates are then reported in the errors table) or remove them")
