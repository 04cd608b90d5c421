"""
flags.py: a script's config dataclass becomes its command-line flags, and the one source of its --help.

    from flags import parse_flags
    cfg = parse_flags(TrainConfig, argv, __doc__)     # --max-steps 100 -> cfg.max_steps == 100

Each field is a --kebab-case flag. The comment after the field, on its line, is the flag's help; a
Literal[...] type (or an entry of `choices`) gives the values it accepts; the field's default is the
flag's default, and --help shows all three. Booleans take --name / --no-name (a field named
no_x takes --no-x alone). A float flag refuses nan and inf with one sentence, for every script at
once: float("nan") parses, and nan slips through every `<` check a script makes afterwards. Every
script of the project reads its flags this way, so a field added to a config dataclass is a
documented flag at once.
Imports no torch: dedup.py, tokenize_data.py, plays.py and pipeline.py run without it.

It also holds what the stages share about files (the sections at the end): how a folder of inputs is
read, and the one rule for writing outputs and removing what a killed run left.
"""

import argparse
import contextlib
import inspect
import math
import os
import re
from dataclasses import MISSING, fields
from pathlib import Path
from typing import get_args


def field_comments(config_class):
    """{field name: the comment after it} read from the dataclass's source."""
    return dict(re.findall(r"^ +(\w+): [^#\n]*?  # (.*)$", inspect.getsource(config_class), re.M))


def finite_float(flag):
    """argparse type of a float flag: nan and inf are one sentence, as the scripts' own checks are."""
    def parse(text):
        value = float(text)  # a ValueError here is argparse's usual "invalid float value"
        if not math.isfinite(value):
            raise SystemExit(f"{flag} {text}: must be a finite number.")
        return value
    parse.__name__ = "float"  # argparse names the type in its own messages
    return parse


def config_parser(config_class, doc, choices=None, aliases=None, given_only=False):
    """An ArgumentParser with a flag per field. given_only: a flag not typed is left out of the parsed
    namespace (no default filled in), so the caller can tell what the user gave (train.py's resume)."""
    choices, aliases, comments = choices or {}, aliases or {}, field_comments(config_class)
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS if given_only else None)
    for f in fields(config_class):
        default = {} if given_only or f.default is MISSING else {"default": f.default}
        shown = "" if f.default is MISSING else f" (default: {f.default!r})"
        text = (comments.get(f.name, "") + shown).replace("%", "%%")  # argparse formats help with %
        names = ["--" + f.name.replace("_", "-"), *aliases.get(f.name, [])]
        if f.type is bool:  # --name / --no-name; a field already named no_x gets --no-x alone
            action = "store_true" if f.name.startswith("no_") else argparse.BooleanOptionalAction
            parser.add_argument(*names, action=action, help=text, **default)
        else:
            allowed = choices.get(f.name) or get_args(f.type) or None
            kind = finite_float(names[0]) if f.type is float else type(f.default)
            parser.add_argument(*names, type=kind, choices=allowed, help=text, **default)
    return parser


def parse_flags(config_class, argv, doc, **options):
    """argv (None: sys.argv) -> a config_class filled from the flags."""
    return config_class(**vars(config_parser(config_class, doc, **options).parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Inputs: a folder is read with everything under it, symlinked subfolders too (a user links a corpus in
# rather than copying it); each real folder is walked once, so a link to an ancestor cannot loop.

def files_under(folder):
    """-> sorted paths (spelled under `folder`) of the files in it and in every subfolder, links followed."""
    found, seen = [], {os.path.realpath(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = [os.path.realpath(os.path.join(root, d)) for d in dirs]
        dirs[:] = [d for d, r in zip(dirs, real) if r not in seen and not seen.add(r)]  # walked once each
        found += [Path(root, f) for f in files if os.path.isfile(os.path.join(root, f))]
    return sorted(found)


# ---------------------------------------------------------------------------------------------
# Outputs: one rule for every stage. An output is written whole to NAME.tmp<pid> beside it, flushed to
# disk, and renamed into place (os.replace is atomic on one filesystem): a reader finds the old file or the
# new one, never half of one. A NAME.tmp or NAME.tmp<pid> beside an output can only be what a killed run
# left, so a stage deletes those of its outputs before it writes them (one run per output folder).

def same_file(a, b):
    """Whether two paths name one file: the same real path (symlinks, '..'), or the same inode (hard links).
    An output that is an input, however spelled, is refused with this."""
    return os.path.realpath(a) == os.path.realpath(b) or (
        os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b))


def temporary_path(path):
    """-> the name this process writes `path` under until it is complete: NAME.tmp<pid>."""
    return f"{path}.tmp{os.getpid()}"


def stale_temporaries(path):
    """-> the NAME.tmp and NAME.tmp<pid> files beside `path` (other names, such as NAME.tmp-notes, are not ours)."""
    folder, name = os.path.split(os.path.abspath(path))
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return [os.path.join(folder, f) for f in sorted(names) if re.fullmatch(re.escape(name) + r"\.tmp\d*", f)]


def remove_stale_temporaries(path):
    """Delete what killed runs left beside `path` -> the paths deleted."""
    stale = stale_temporaries(path)
    for p in stale:
        os.remove(p)
    return stale


@contextlib.contextmanager
def atomic_output(path, mode="wb", **open_args):
    """with atomic_output(path) as f: ... writes f to path's temporary and renames it into place on success;
    on any error (or Ctrl-C) the temporary is deleted and `path` stays as it was."""
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, **open_args) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data):
    """data (bytes, or a contiguous numpy array written raw) -> path, by the rule above."""
    with atomic_output(path) as f:
        f.write(data)
