"""Accounts on a team's MLflow server that runs with MLflow's authentication app
(`mlflow server --app-name basic-auth`): each person gets a user and one role, ``trainer``
(reads, runs stages that log, registers models) or ``viewer`` (reads only).

Run it as the server's admin, the new user's password on standard input::

    export MLFLOW_TRACKING_URI=http://mlflow.example:5000
    export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=...
    python -m imgclf.team add alice trainer < alice.password
"""
from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

WORKSPACE = "default"
# every experiment and registered model, present and future, at one permission per role
ROLES = {"trainer": "EDIT", "viewer": "READ"}
RESOURCES = ("experiment", "registered_model")


def ensure_role(auth: Any, role: str) -> int:
    """The id of the server role ``role``, created with its permissions if new."""
    for existing in auth.list_roles(WORKSPACE):
        if existing.name == role:
            return existing.id
    created = auth.create_role(WORKSPACE, role, description=f"imgclf {role}s")
    for resource in RESOURCES:
        auth.add_role_permission(created.id, resource, "*", ROLES[role])
    return created.id


def add_user(auth: Any, username: str, password: str, role: str) -> None:
    """Create ``username`` (or keep the existing user) and give it ``role``."""
    from mlflow.exceptions import MlflowException

    try:
        auth.create_user(username, password)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    role_id = ensure_role(auth, role)
    if all(assigned.id != role_id for assigned in auth.list_user_roles(username)):
        auth.assign_role(username, role_id)


def _read_password() -> str:
    if sys.stdin.isatty():
        return getpass.getpass("password for the new user: ")
    return sys.stdin.readline().rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgclf.team", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add", help="add a user with a role (password on standard input)")
    add.add_argument("username")
    add.add_argument("role", choices=sorted(ROLES))
    args = parser.parse_args(argv)

    import warnings

    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():  # mlflow.server's own imports warn about a starlette deprecation
        warnings.simplefilter("ignore")
        from mlflow.server.auth.client import AuthServiceClient

    from .track.tracking import TrackingError, check_server, tracking_uri

    uri = tracking_uri(Path.cwd())
    if not uri.startswith(("http://", "https://")):
        print("error: set MLFLOW_TRACKING_URI to the team server's URL (http://host:port); accounts live on a "
              "server started with --app-name basic-auth, not in a local store", file=sys.stderr)
        return 2
    password = _read_password()
    if not password:
        print("error: no password given for the new user (standard input was empty)", file=sys.stderr)
        return 2
    try:
        check_server(uri, remedy="Start it, or fix MLFLOW_TRACKING_URI")
        add_user(AuthServiceClient(uri), args.username, password, args.role)
    except MlflowException as err:
        print(f"error: MLflow server {uri} refused ({err.error_code}): {' '.join(str(err).split())[:300]}. "
              "Run this as the server's admin (MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD)",
              file=sys.stderr)
        return 1
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.username}: {args.role} on {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
