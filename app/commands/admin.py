"""Operator commands: `migrate`, `catalog seed-pmi|list`, `apikey create|list|revoke`."""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from app.config import get_settings, redacted_url
from app.db import Database
from app.log import configure_logging
from app.orm import Role


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add the operator commands to the `rxverify` parser."""
    migrate = sub.add_parser("migrate", help="upgrade the database schema to the newest revision")
    migrate.add_argument("--revision", default="head", help="upgrade to this revision (default: head)")
    migrate.add_argument("--downgrade", metavar="REVISION",
                         help="downgrade to REVISION instead (e.g. base, which drops every table)")
    migrate.set_defaults(func=migrate_command)

    seed = groups["catalog"].add_parser("seed-pmi", help="load the 20 PMI products and the PMI expert costs")
    seed.set_defaults(func=seed_pmi_command)
    listing = groups["catalog"].add_parser("list", help="print the product catalog")
    listing.set_defaults(func=catalog_list_command)

    create = groups["apikey"].add_parser("create", help="create an API key (printed once, as the last line)")
    create.add_argument("--role", required=True, choices=[r.value for r in Role])
    create.add_argument("--name", required=True, help="who or what holds the key")
    create.set_defaults(func=apikey_create_command)
    keys = groups["apikey"].add_parser("list", help="list API keys (never their secrets)")
    keys.set_defaults(func=apikey_list_command)
    revoke = groups["apikey"].add_parser("revoke", help="revoke an API key by id")
    revoke.add_argument("key_id", type=int)
    revoke.add_argument("--reason", default=None)
    revoke.set_defaults(func=apikey_revoke_command)


def _database() -> Database:
    settings = get_settings()
    configure_logging(settings)
    return Database(settings)


def _operator(command: str) -> Any:
    from app.services.audit import Actor

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return Actor.cli(f"{command} ({user})")


def migrate_command(args: argparse.Namespace) -> int:
    """Run Alembic against the configured database."""
    from app import migrate

    settings = get_settings()
    configure_logging(settings)
    try:
        if args.downgrade:
            migrate.downgrade(settings, args.downgrade)
        else:
            migrate.upgrade(settings, args.revision)
    except migrate.UnknownRevision as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"database {redacted_url(settings.database_url)} is at revision {migrate.current_revision(settings)}")
    return 0


def seed_pmi_command(_args: argparse.Namespace) -> int:
    """Seed the PMI catalog and expert cost matrix (a second run changes nothing)."""
    from app.services.catalog_seed import seed_pmi

    database = _database()
    try:
        with database.session() as session:
            result = seed_pmi(session, actor=_operator("catalog seed-pmi"), max_cost=database.settings.max_cost)
    finally:
        database.dispose()
    print(f"products added: {result.products_added}")
    state = "created" if result.cost_matrix_created else "unchanged"
    print(f"cost-matrix version: {result.cost_matrix_version} ({state}"
          f"{', activated' if result.cost_matrix_activated else ''})")
    return 0


def catalog_list_command(_args: argparse.Namespace) -> int:
    """Print the catalog, one product per line."""
    from app.services.products import list_products

    database = _database()
    try:
        with database.session() as session:
            for product in list_products(session):
                flag = "" if product.active else "  (inactive)"
                print(f"{product.ndc}  {product.name}{flag}")
    finally:
        database.dispose()
    return 0


def apikey_create_command(args: argparse.Namespace) -> int:
    """Create a key; its secret is the last line of output and is not stored anywhere."""
    from app.services.api_keys import create_api_key

    database = _database()
    try:
        with database.session() as session:
            key, token = create_api_key(session, role=Role(args.role), name=args.name,
                                        actor=_operator("apikey create"))
            key_id = key.id
    finally:
        database.dispose()
    print(f"created API key {key_id} ({args.role}) for {args.name!r}; it is shown only once:")
    print(token)
    return 0


def apikey_list_command(_args: argparse.Namespace) -> int:
    """List keys: id, prefix, role, name, revoked."""
    from app.services.api_keys import list_api_keys

    database = _database()
    try:
        with database.session() as session:
            for key in list_api_keys(session):
                revoked = f"revoked {key.revoked_at.isoformat()}" if key.revoked_at else "active"
                print(f"{key.id}\t{key.prefix}\t{key.role}\t{key.name}\t{revoked}")
    finally:
        database.dispose()
    return 0


def apikey_revoke_command(args: argparse.Namespace) -> int:
    """Revoke a key by id."""
    from app.errors import DomainError
    from app.services.api_keys import revoke_api_key

    database = _database()
    try:
        with database.session() as session:
            revoke_api_key(session, key_id=args.key_id, actor=_operator("apikey revoke"), reason=args.reason)
    except DomainError as exc:
        print(f"error: {exc.detail}")
        return 1
    finally:
        database.dispose()
    print(f"revoked API key {args.key_id}")
    return 0


