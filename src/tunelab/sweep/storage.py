"""Where a sweep keeps its studies, and the flags a resumed sweep continues with (run.json)."""
from __future__ import annotations

import functools
from pathlib import Path


def optuna_storage(url: str):
    """What optuna is given for `url`: for a database server one storage object per process and URL, since each
    optuna call given a URL builds its own connection pool (a worker held 24 connections for four methods;
    PostgreSQL allows 100 by default). A SQLite file is opened afresh each time (a folder cleared by
    --overwrite makes a new file, which a kept connection would not see)."""
    if not isinstance(url, str) or url.startswith("sqlite"):
        return url
    return server_storage(url)


@functools.lru_cache(maxsize=8)
def server_storage(url: str):
    import optuna

    return optuna.storages.get_storage(url)


def default_storage(out_dir: Path) -> str:
    return f"sqlite:///{(out_dir / 'sweep.db').resolve()}"


def storage_record(url: str | None) -> str | None:
    """The storage as run.json keeps it: without its password (an output folder is no place for one)."""
    from sqlalchemy.engine import make_url  # optuna's RDB storage is built on it

    if url is None:
        return None
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: optuna says what is wrong with it
        return url


def storage_problems(url: str | None) -> list[str]:
    """A --storage optuna could not open, found before the output folder is written: not a database URL, an
    unknown database or driver, a server or file that cannot be reached."""
    if url is None:
        return []
    import sqlalchemy
    from sqlalchemy.engine import make_url

    example = "e.g. sqlite:///sweep.db or postgresql://user:password@host/database"
    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except (sqlalchemy.exc.NoSuchModuleError, ImportError) as exc:  # (NoSuchModuleError is an ArgumentError)
        return [f"--storage: {storage_record(url)!r}: {exc}; {example}"]
    except sqlalchemy.exc.ArgumentError:
        return [f"--storage: {url!r} is not a database URL; {example}"]
    if parsed.get_backend_name() == "sqlite":  # checked without connecting, which would create the file
        database = sqlite_file(parsed)
        if database is None:
            return [f"--storage: {url!r} is an in-memory database, which the trials' own processes do not see; "
                    "give a file, e.g. sqlite:///sweep.db"]
        folder = Path(database).expanduser().parent
        return [] if folder.is_dir() else [f"--storage: cannot open {url!r}: the folder {str(folder)!r} "
                                           "does not exist"]
    try:
        engine = sqlalchemy.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - the driver's own words say what is wrong (host, file, password)
        from ..models.loading import first_line

        return [f"--storage: cannot open {storage_record(url)!r}: {first_line(exc) or type(exc).__name__}"]
    return []


def absolute_storage(url: str | None) -> str | None:
    """A SQLite path relative to where the sweep started, made absolute: run.json keeps it, and a --resume
    from another folder must open the same file, not start a new study beside it."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url) if url else None
    except Exception:  # noqa: BLE001 - not a URL: storage_problems says so
        return url
    database = sqlite_file(parsed) if parsed is not None and parsed.get_backend_name() == "sqlite" else None
    if database is None or Path(database).is_absolute():
        return url
    return parsed.set(database=str(Path(database).expanduser().resolve())).render_as_string(hide_password=False)


def sqlite_file(parsed) -> str | None:
    """The file a SQLite URL names; None for an in-memory database (no path, or ':memory:')."""
    return parsed.database if parsed.database not in (None, "", ":memory:") else None


DEFAULT_TRIALS = 20


def sweep_flags(out_dir: Path, resume: bool, storage: str | None, name: str | None,
                nproc: int | None = None, trials: int | None = None) -> tuple[dict, list[str]]:
    """--storage and --study-name: as given, or on --resume as the sweep was started (a new study in another
    storage would start from trial 0 and overwrite the earlier trials' files). A password is not saved, so a
    sweep on a database with one is resumed with --storage given again. --nproc: as given, else as started
    (else 1); unlike those it may change on resume, as for compare: the global batch stays the same. --trials:
    as given, else as started (a resumed 3-trial sweep ran on to 20), else 20."""
    from ..experiment.folder import command_problems, saved_flags

    storage = absolute_storage(storage)
    if not resume:
        return {"storage": storage, "study_name": name, "nproc": nproc or 1, "trials": trials or DEFAULT_TRIALS}, []
    saved, problems = saved_flags(out_dir), command_problems(out_dir, "sweep")
    started = {"storage": saved.get("storage"), "study_name": saved.get("study_name")}
    given = {"storage": storage_record(storage), "study_name": name}
    defaults = {"storage": "its own sweep.db", "study_name": "the study name derived from its config"}
    for flag, value in given.items():
        if value is not None and value != started[flag]:
            option = f"--{flag.replace('_', '-')}"
            problems.append(f"{option}: {value}, but {str(out_dir)!r} was started with "
                            f"{started[flag] or defaults[flag]}; resume it with that (or leave {option} out)")
    if storage is None and started["storage"] and "***" in started["storage"]:
        problems.append(f"--storage: {str(out_dir)!r} sweeps in {started['storage']}; its password is not saved, "
                        "so give --storage with it to resume")
    return {"storage": storage or started["storage"], "study_name": name or started["study_name"],
            "nproc": nproc or saved.get("nproc") or 1,  # (folders of earlier versions kept neither)
            "trials": trials or saved.get("trials") or DEFAULT_TRIALS}, problems
