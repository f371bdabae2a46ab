"""task=predict's ``inputs``: image files, folders (searched recursively) and glob patterns → a list of files.

A named file is taken as it is (if it is no image, reading it fails and is reported with the others); a folder or a
glob contributes its PNG and JPEG files, hidden ones skipped, in sorted order. A path that does not exist, a glob
that matches nothing and a folder without images are mistakes in the config: all of them are reported at once.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, Sequence, Union

from cnnrun.data.folder import EXTENSIONS, image_files
from cnnrun.errors import ConfigError, Problem

GLOB_CHARS = "*?["


def collect_inputs(inputs: Union[None, str, Sequence[str]]) -> List[Path]:
    """Every image file ``inputs`` names, each once, in the order given; a ConfigError lists what names nothing."""
    if not inputs:
        raise ConfigError([Problem("inputs", "task=predict needs the images to predict: inputs=PATH, a file, a "
                                             "folder or a glob such as inputs='photos/*.jpg' (or a list: "
                                             "inputs=[a.png,photos/])")], "the config")
    entries = [inputs] if isinstance(inputs, str) else list(inputs)
    files: List[Path] = []
    problems: List[Problem] = []
    for entry in entries:
        found, problem = _expand(str(entry))
        files += found
        if problem:
            problems.append(Problem("inputs", f"{entry}: {problem}"))
    if problems:
        raise ConfigError(problems, "the config")
    return list(dict.fromkeys(files))  # a file named twice is predicted once


def _expand(entry: str):
    """(files, '' or what is wrong) for one entry of ``inputs``."""
    path = Path(entry).expanduser()
    if any(char in entry for char in GLOB_CHARS) and not path.exists():
        matches = sorted(glob.glob(str(path), recursive=True))
        found: List[Path] = []
        for match in map(Path, matches):
            if match.is_dir():
                found += image_files(match)
            elif _is_image_name(match):
                found.append(match)
        if not matches:
            return [], "the pattern matches no file"
        return found, "" if found else f"the pattern matches no {_kinds()} file"
    if path.is_dir():
        found = image_files(path)
        return found, "" if found else f"a folder with no {_kinds()} files (sub-folders searched too)"
    if path.exists():
        return [path], ""
    return [], "no such file or folder"


def _is_image_name(path: Path) -> bool:
    return not path.name.startswith(".") and os.path.splitext(path.name)[1].lower() in EXTENSIONS


def _kinds() -> str:
    return "/".join(ext[1:].upper() for ext in EXTENSIONS)
