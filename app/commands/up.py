"""`rxverify up` (what `make run` runs): migrate, seed, make the demo model and keys once, then serve.

Every step is idempotent, so a second run reuses everything and serves within seconds: the schema is
at head, the catalog seeded, a model active, and the demo keys are read back from their file
(`data_dir/keys/demo-keys.env`, created with mode 0600). The database stores only the keys' SHA-256,
so that file is the only copy of the secrets.
"""

from __future__ import annotations

import argparse
import errno
import logging
import shlex
import socket
import sys
from pathlib import Path
from typing import Any

from app.config import Settings, get_settings
from app.db import Database
from app.log import configure_logging
from app.orm import Role
from models.files import atomic_write

logger = logging.getLogger(__name__)

KEY_FILE = "demo-keys.env"
KEY_VARIABLES = {Role.ADMIN: "ADMIN_KEY", Role.PHARMACIST: "PHARMACIST_KEY", Role.CLIENT: "CLIENT_KEY"}
EXAMPLE_NDC = "50111-0434"  # trazodone: the product the README walkthrough follows


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add `up` to the `rxverify` parser."""
    up = sub.add_parser(
        "up", help="first-run setup (demo dataset, model and keys, once), then serve the API and a local worker",
        description="Migrate the database, seed the PMI catalog, and on a database without any model render the "
                    "synthetic demo dataset, train and activate a baseline (about 10 minutes on 2 CPU cores), "
                    "create an admin, a pharmacist and a client key (stored in DATA_DIR/keys/demo-keys.env), "
                    "then serve. A second run reuses all of it.")
    up.add_argument("--host", default=None, help="bind address (default RXVERIFY_HOST, 127.0.0.1)")
    up.add_argument("--port", type=int, default=None, help="port (default RXVERIFY_PORT, 8000)")
    up.set_defaults(func=up_command)


def up_command(args: argparse.Namespace) -> int:
    """Make everything the demo needs (once), print how to use it, and serve until Ctrl-C."""
    from app.commands.admin import migrate_command, seed_pmi_command
    from app.commands.first_run import FirstRunError, ensure_model
    from app.commands.runtime import run_api

    settings = get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    host, port = args.host or settings.host, args.port or settings.port
    if (problem := port_problem(host, port)) is not None:  # before minutes of first-run work, not after
        print(f"error: cannot serve on {host}:{port}: {problem}", file=sys.stderr)
        return 2
    if migrate_command(argparse.Namespace(downgrade=None, revision="head")) != 0:
        return 2  # it said why (a database from a newer rxverify)
    seed_pmi_command(argparse.Namespace())
    database = Database(settings)
    try:
        model_version = ensure_model(settings, database)
        keys = ensure_keys(settings, database)
        example = example_image(settings, database)
    except FirstRunError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: run it again to carry on (a half-rendered dataset is resumed; a model is registered "
              "only once its training has finished)", file=sys.stderr)
        return 130
    except Exception as error:  # the traceback goes to the log; the person at the terminal gets the gist
        logger.exception("the first-run setup failed")
        print(f"error: the first-run setup failed ({type(error).__name__}: {error}); nothing half-made is used: "
              "fix the cause and run it again", file=sys.stderr)
        return 1
    finally:
        database.dispose()
    print(banner(settings, host=host, port=port, keys=keys, example=example, model_version=model_version), flush=True)
    return run_api(settings, host=host, port=port, worker=None)


def port_problem(host: str, port: int) -> str | None:
    """Why the API could not bind host:port (already in use, ...), or None when it can."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return "the port is in use (another `rxverify up` or `serve`?); stop it, or pick another port (--port, RXVERIFY_PORT)"
            return error.strerror or str(error)
    return None


# --- the demo keys --------------------------------------------------------------------------------
def key_file(settings: Settings) -> Path:
    """Where `up` keeps the demo keys."""
    return settings.keys_dir / KEY_FILE


def read_keys(path: Path) -> dict[Role, str]:
    """The keys in a key file (NAME=token lines); empty when there is no file."""
    if not path.is_file():
        return {}
    names = {variable: role for role, variable in KEY_VARIABLES.items()}
    keys: dict[Role, str] = {}
    for line in path.read_text().splitlines():
        name, _, value = line.strip().partition("=")
        if name in names and value:
            keys[names[name]] = value
    return keys


def write_keys(path: Path, keys: dict[Role, str]) -> None:
    """Write the key file atomically, created owner-only (0600) from the start: never readable by others."""
    lines = ["# rxverify demo API keys, made by `rxverify up`. The database keeps only their SHA-256, so this",
             "# file is the only copy. Load them into a shell with:  . " + str(path)]
    lines += [f"{KEY_VARIABLES[role]}={keys[role]}" for role in KEY_VARIABLES]
    with atomic_write(path) as handle:  # created 0600
        handle.write(("\n".join(lines) + "\n").encode())


def ensure_keys(settings: Settings, database: Database) -> dict[Role, str]:
    """The demo keys from the key file; a role whose key is missing, unknown or revoked gets a new one."""
    from app.errors import Unauthorized
    from app.services.api_keys import authenticate, create_api_key
    from app.services.audit import Actor

    path = key_file(settings)
    keys = read_keys(path)
    with database.session() as session:
        missing = []
        for role in KEY_VARIABLES:
            if role not in keys:
                missing.append(role)
                continue
            try:
                valid = authenticate(session, keys[role]).role == role
            except Unauthorized as error:
                print(f"the {role.value} key in {path} is no longer valid ({error.detail}); making a new one")
                valid = False
            if not valid:
                missing.append(role)
        if not missing:
            print(f"API keys read from {path}")
            return keys
        for role in missing:
            _key, keys[role] = create_api_key(session, role=role, name=f"demo-{role.value}",
                                              actor=Actor.cli("up (demo keys)"))
        write_keys(path, keys)  # inside the transaction: if the file cannot be written, no key is created
    print(f"API keys created ({', '.join(r.value for r in missing)}) and stored in {path} (mode 0600)")
    return keys


# --- what to print -------------------------------------------------------------------------------------
def example_image(settings: Settings, database: Database) -> tuple[Path, str] | None:
    """A test-split photo of the demo dataset and its NDC (None when there is no demo dataset)."""
    from sqlalchemy import select

    from app.commands.first_run import DEMO_DATASET
    from app.orm import Dataset

    with database.session() as session:
        path = session.scalar(select(Dataset.path).where(Dataset.name == DEMO_DATASET))
    if path is None:
        return None
    folders = [Path(path) / "test" / EXAMPLE_NDC, *sorted((Path(path) / "test").glob("*"))]
    for folder in folders:
        images = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
        if images:
            return images[0], folder.name
    return None


def banner(settings: Settings, *, host: str, port: int, keys: dict[Role, str], example: tuple[Path, str] | None,
           model_version: int | None) -> str:
    """The URL, the keys and a ready-to-paste verification."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    lines = ["", f"rxverify: the API will be at {url} (docs {url}/docs) once /readyz answers 200; "
                 "Ctrl-C stops the API and its worker.",
             f"model version {model_version} is active" if model_version is not None else
             "no model is active: verifications answer 503 model-unavailable",
             f"API keys (also in {key_file(settings)}):"]
    lines += [f"  {role.value:<11} {keys[role]}" for role in KEY_VARIABLES]
    if example is not None:
        image, ndc = example
        lines += [f"Verify a demo photo (a bottle of {ndc} from the test split):",
                  f"  curl -s -H 'X-API-Key: {keys[Role.CLIENT]}' -F {shlex.quote(f'image=@{image}')} "
                  f"-F prescribed_ndc={ndc} {url}/v1/verifications"]
    return "\n".join(lines) + "\n"
